"""Bad input refused before the long work: one stderr line, exit 2, nothing written, the input untouched."""

from __future__ import annotations

import hashlib

import pytest
import torch

from mcsmoe_deploy.cli import main
from mcsmoe_deploy.compress.calibrated import check_finite
from mcsmoe_deploy.errors import UserError

from conftest import tiny_model

FAST = ["--experts", "4", "--max-calib-tokens", "256", "--quiet"]


def _digest(folder) -> str:
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


@pytest.fixture
def calibration_files(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 cr\u00e8me, d\u00e9j\u00e0 vu. ".encode("latin-1") * 50)
    control = tmp_path / "control.txt"
    control.write_bytes(bytes(range(1, 9)) * 400 + b"some words")
    return {"latin1": latin1, "control": control}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--distill-steps", "2", "--distill-lr", "inf"], "--distill-lr must be a positive finite number, not inf"),
        (["--rank-ratio", "0.5", "--rank-energy", "0.9"], "--rank-energy chooses the rank itself; it cannot be "
                                                          "combined with rank_ratio 0.5"),
        (["--device", "tpu"], "unknown device 'tpu'; use cpu, cuda, cuda:N or auto"),
        (["--device", "meta"], "device 'meta' is not supported; use cpu, cuda, cuda:N or auto"),
        (["--calib", "{latin1}"], "is not UTF-8 text (byte 3: b'\\xe9'); convert it to UTF-8"),
        (["--calib", "{control}"], "is mostly not text (0% printable characters, at least 90% needed)"),
    ],
    ids=["distill-lr-inf", "rank-ratio-and-energy", "device-tpu", "device-meta", "calib-latin1", "calib-control"],
)
def test_bad_input_is_one_line_and_writes_nothing(extra, message, tiny_dirs, calibration_files, tmp_path, capsys):
    source = tiny_dirs["mixtral"]
    before = _digest(source)
    out = tmp_path / "out"
    extra = [arg.format(**calibration_files) for arg in extra]
    assert main(["compress", str(source), str(out), *FAST, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _digest(source) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tiny_dirs, tmp_path, capsys):
    assert main(["compress", str(tiny_dirs["mixtral"]), str(tmp_path / "out"), *FAST, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device 'cuda' asked for, but this machine has no CUDA GPU" in err[0]


def test_non_finite_weights_are_named_and_stop_the_write():
    model = tiny_model("mixtral")
    check_finite(model, "distillation")  # a sane model passes
    name = "model.layers.1.self_attn.q_proj.weight"
    with torch.no_grad():
        model.get_parameter(name)[3, 2] = float("nan")
    with pytest.raises(UserError, match=f"^distillation left non-finite values in {name}; nothing was written$"):
        check_finite(model, "distillation")


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_an_output_that_would_destroy_the_input_is_refused(where, tiny_dirs, tmp_path, capsys):
    import shutil

    project = tmp_path / "project"
    source = project / "model"
    shutil.copytree(tiny_dirs["mixtral"], source)
    (project / "notes.txt").write_text("unrelated work")
    out = {"same": source, "parent": project, "inside": source / "small", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(tmp_path / "elsewhere")
    before = _digest(source)
    assert main(["compress", str(source), str(out), *FAST, "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"same": "is the input", "parent": "contains the input", "inside": "is inside the input",
                "symlink": "is a symbolic link"}[where]
    assert len(err) == 1 and expected in err[0], err
    assert _digest(source) == before and (project / "notes.txt").read_text() == "unrelated work"
    assert not (source / "small").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda config: [config], "holds a JSON list, not an object of settings"),
        (lambda config: {**config, "num_local_experts": "4"}, "Field 'num_local_experts' expected int, got str"),
        (lambda config: {**config, "num_experts_per_tok": 9}, "9 experts per token, but the model has 8 experts"),
        (lambda config: {**config, "hidden_size": 0}, "hidden size must be a positive integer, not 0"),
        (None, "is not UTF-8 text"),
    ],
    ids=["list", "experts-string", "top-k-too-large", "hidden-zero", "not-utf8"],
)
@pytest.mark.parametrize("command", ["compress", "export"])
def test_a_lying_config_is_one_line(edit, message, command, tiny_dirs, tmp_path, capsys):
    import json
    import shutil

    source = tmp_path / "model"
    shutil.copytree(tiny_dirs["mixtral"], source)
    config_path = source / "config.json"
    if edit is None:
        config_path.write_bytes(config_path.read_bytes().replace(b'"mixtral"', b'"mixtral\xff"'))
    else:
        config_path.write_text(json.dumps(edit(json.loads(config_path.read_text()))))
    out = tmp_path / ("out" if command == "compress" else "out.onnx")
    argv = [command, str(source), str(out), "--quiet"] + (FAST[:2] if command == "compress" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not out.exists()


def test_a_folder_without_a_tokenizer_says_so(tiny_dirs, tmp_path, capsys):
    import shutil

    source = tmp_path / "model"
    shutil.copytree(tiny_dirs["mixtral"], source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink(missing_ok=True)
    assert main(["compress", str(source), str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no tokenizer in {source} (calibration needs one)" in err[0], err


def test_a_tokenizer_beyond_the_vocabulary_is_refused(tiny_dirs, tmp_path, capsys):
    import shutil

    from conftest import VOCAB, byte_tokenizer

    source = tmp_path / "model"
    shutil.copytree(tiny_dirs["mixtral"], source)
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens([f"word{i}" for i in range(VOCAB)] + ["the", " the", "The"])  # ids past the model's VOCAB
    tokenizer.save_pretrained(source)
    assert main(["compress", str(source), str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the model: token id" in err[0] and f"vocabulary of {VOCAB}" in err[0], err


def _write_lying_safetensors(path, header: object, data: bytes = b"\0" * 64) -> None:
    import json

    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(
    "header, message",
    [
        ([1, 2], "its header is a JSON list, not an object"),
        ({"w": {"dtype": "F32", "shape": [4]}}, "the header entry needs dtype, shape and data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 64]}},
         "64 bytes do not hold a F32 tensor of shape"),
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
          "b": {"dtype": "F32", "shape": [8], "data_offsets": [16, 48]}}, "tensors a and b overlap"),
        ({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, "truncated or corrupt (tensor w at bytes 0..256 of 64)"),
        ({"w": {"dtype": "Q4", "shape": [8], "data_offsets": [0, 4]}}, "unknown dtype 'Q4'"),
    ],
    ids=["list", "no-offsets", "huge-shape", "overlap", "past-the-end", "dtype"],
)
def test_a_lying_safetensors_header_is_one_line(header, message, tiny_dirs, tmp_path, capsys):
    import shutil

    source = tmp_path / "model"
    shutil.copytree(tiny_dirs["mixtral"], source)
    _write_lying_safetensors(source / "model.safetensors", header)
    assert main(["compress", str(source), str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_pickled_weights_are_never_opened(tiny_dirs, tmp_path, capsys):
    import shutil

    source = tmp_path / "model"
    shutil.copytree(tiny_dirs["mixtral"], source)
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(b"not even a pickle: opening it would fail loudly")
    assert main(["compress", str(source), str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds pickled weights (pytorch_model.bin)" in err[0] and "convert them to safetensors" in err[0]


def test_switch_export_into_its_own_model_folder_is_refused(tiny_dirs, tmp_path, capsys):
    import shutil

    source = tmp_path / "switch"
    shutil.copytree(tiny_dirs["switch_transformers"], source)
    before = _digest(source)
    assert main(["export", str(source), str(source), "--force", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the input" in err[0], err
    assert _digest(source) == before
