"""`mcsmoe export` / `mcsmoe-export`: a validated ONNX file, or one clear line and nothing written."""

import re

import pytest

from mcsmoe_deploy import CompressionRecipe, compress_model
from mcsmoe_deploy.cli import main, main_export


@pytest.fixture(scope="module")
def compressed_dir(tiny_dirs, tmp_path_factory):
    recipe = CompressionRecipe(experts=3, rank_ratio=0.5, sparse_keep=0.1, max_calib_tokens=1024, calib_seq_len=32)
    out = tmp_path_factory.mktemp("export") / "compressed"
    compress_model(tiny_dirs["mixtral"], out, recipe, progress=False)
    return out


def test_export_writes_a_validated_graph(compressed_dir, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main_export([str(compressed_dir), str(out), "--no-past"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and not list(tmp_path.glob("*.tmp*"))
    assert "GroupedLowRankMoE nodes: 2" in printed
    relative = float(re.search(r"relative ([0-9.e+-]+)", printed).group(1))
    assert relative < 1e-4


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("with-past", [], "KV-cache"),
        ("dense", ["--no-past"], "dense checkpoint"),
        ("exists", ["--no-past"], "already exists"),
        ("no-parent", ["--no-past"], "parent folder of the output does not exist"),
        ("missing", ["--no-past"], "model directory not found"),
    ],
)
def test_export_refuses_with_one_line(case, extra, message, compressed_dir, tiny_dirs, tmp_path, capsys):
    model = {"dense": tiny_dirs["mixtral"], "missing": tmp_path / "nope"}.get(case, compressed_dir)
    out = tmp_path / ("absent" if case == "no-parent" else "") / "model.onnx"
    if case == "exists":
        out.write_text("keep me")
    assert main(["export", str(model), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mcsmoe: error:") and message in err[0]
    if case == "exists":
        assert out.read_text() == "keep me"
    else:
        assert not out.exists()


def test_exported_graph_handles_left_padding_and_single_tokens(compressed_dir, tmp_path):
    import numpy as np
    import onnxruntime as ort
    import torch

    from mcsmoe_deploy import export_model, load_compressed

    out = tmp_path / "model.onnx"
    export_model(compressed_dir, out, validate=False)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = load_compressed(compressed_dir)
    generator = torch.Generator().manual_seed(3)
    padded = torch.randint(1, 256, (2, 7), generator=generator)
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    single = torch.randint(1, 256, (3, 1), generator=generator)
    for ids, attention in [(padded, mask), (single, torch.ones_like(single))]:
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=attention).logits.numpy()
        (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": attention.numpy()})
        valid = attention.numpy().astype(bool)  # padded positions' logits are not defined
        assert np.abs(got[valid] - expected[valid]).max() < 1e-4 * np.abs(expected[valid]).max()
