"""`mcsmoe compress` rejects bad input cleanly.

Every mistake a user can make (a missing or non-MoE model, an unsupported MoE
type, out-of-range options, bad calibration text, truncated weights, an output
that exists or cannot be created) must give a non-zero exit code and exactly one
`mcsmoe: error: ...` line on stderr naming the key fact, with no traceback and
nothing half-written: no output directory and no `.<name>.*` staging folder
beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcsmoe_deploy.cli import main

FAST = ["--max-calib-tokens", "512", "--quiet"]


def _no_moe_llama(path: Path) -> Path:
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _unsupported_moe(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "n_routed_experts": 8}))
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def _truncated(path: Path, source: Path) -> Path:
    shutil.copytree(source, path)
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return path


def _no_config(path: Path) -> Path:
    path.mkdir()
    (path / "README.md").write_text("not a model\n")
    return path


# model kind -> builder(path, tiny_dirs) of the model directory passed to `mcsmoe compress`
MODELS = {
    "mixtral": lambda path, tiny: tiny["mixtral"],
    "missing": lambda path, tiny: path,
    "no_config": lambda path, tiny: _no_config(path),
    "llama": lambda path, tiny: _no_moe_llama(path),
    "deepseek": lambda path, tiny: _unsupported_moe(path),
    "truncated": lambda path, tiny: _truncated(path, tiny["mixtral"]),
}

# (model kind, extra arguments, substrings the error line must contain); {model} and {calib} are filled in
CASES = [
    pytest.param("missing", [], ["model directory not found", "{model}"], id="missing-model"),
    pytest.param("no_config", [], ["no config.json", "{model}"], id="no-config"),
    pytest.param("llama", [], ["not a mixture-of-experts model", "'llama'", "supported families", "mixtral"],
                 id="not-moe"),
    pytest.param("deepseek", [], ["unsupported mixture-of-experts model type", "deepseek_v3", "supported families"],
                 id="unsupported-moe"),
    pytest.param("truncated", [], ["truncated", "model.safetensors"], id="truncated-weights"),
    pytest.param("mixtral", ["--experts", "9"], ["--experts", "8 experts", "not 9"], id="experts-9"),
    pytest.param("mixtral", ["--experts", "0"], ["--experts", "at least 1", "0"], id="experts-0"),
    *[pytest.param("mixtral", ["--rank-ratio", r], ["--rank-ratio", "(0, 1]", r], id=f"rank-ratio={r}")
      for r in ("0", "1.5", "-0.1")],
    pytest.param("mixtral", ["--sparse-keep", "1.5"], ["--sparse-keep", "[0, 1]", "1.5"], id="sparse-keep=1.5"),
    pytest.param("mixtral", ["--distill-lr", "0"], ["--distill-lr", "positive", "0"], id="distill-lr=0"),
    pytest.param("mixtral", ["--format", "standard", "--adaptive"], ["--format standard", "layer-adaptive G"],
                 id="standard-adaptive"),
    pytest.param("mixtral", ["--format", "standard", "--rank-ratio", "0.5"], ["--format standard", "low-rank"],
                 id="standard-low-rank"),
    pytest.param("mixtral", ["--format", "standard", "--quantize", "int8"], ["--format standard", "quantized"],
                 id="standard-quantized"),
    pytest.param("mixtral", ["--router-steps", "5"], ["--router-steps needs --calibrate-router"],
                 id="router-steps-alone"),
    pytest.param("mixtral", ["--calibrate-router", "--router-lr", "0"], ["--router-lr", "positive", "0"],
                 id="router-lr=0"),
    pytest.param("mixtral", ["--calibrate-router", "--router-steps", "0"], ["--router-steps", "at least 1"],
                 id="router-steps=0"),
    pytest.param("mixtral", ["--calib", "{calib}/empty.txt"], ["calibration file is empty", "{calib}/empty.txt"],
                 id="calib-empty"),
    pytest.param("mixtral", ["--calib", "{calib}/missing.txt"], ["calibration file not found", "{calib}/missing.txt"],
                 id="calib-missing"),
    pytest.param("mixtral", ["--calib", "{calib}/bad.jsonl"], ["{calib}/bad.jsonl:2", "not valid JSON"],
                 id="calib-bad-jsonl"),
]


@pytest.fixture
def calib(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "empty.txt").write_text("")
    (folder / "bad.jsonl").write_text('{"text": "a fine first line"}\nnot json at all\n{"text": "fine"}\n')
    return folder


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, needles: list[str]) -> None:
    assert code != 0, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("mcsmoe: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists(), f"{out_dir} was left behind"
    if out_dir.parent.exists():
        stray = sorted(p.name for p in out_dir.parent.glob(f".{out_dir.name}.*"))
        assert not stray, f"staging folders left in {out_dir.parent}: {stray}"


@pytest.mark.parametrize("kind, extra, needles", CASES)
def test_bad_input_is_one_clean_line(kind, extra, needles, tiny_dirs, tmp_path, calib, capsys):
    model = MODELS[kind](tmp_path / f"model_{kind}", tiny_dirs)
    out_dir = tmp_path / "out"
    fill = lambda s: s.format(model=model, calib=calib)  # noqa: E731
    code, out, err = run(capsys, ["compress", model, out_dir, *FAST, *map(fill, extra)])
    assert_one_error_line(code, err, [fill(n) for n in needles])
    assert out == ""
    assert_nothing_written(out_dir)


def test_existing_output_needs_force(tiny_dirs, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("old")
    argv = ["compress", tiny_dirs["mixtral"], out_dir, *FAST]

    code, out, err = run(capsys, argv)
    assert_one_error_line(code, err, ["already exists", str(out_dir), "--force"])
    assert out == ""
    assert sorted(p.name for p in out_dir.iterdir()) == ["stale.txt"], "existing output was touched"

    code, out, err = run(capsys, [*argv, "--force", "--distill-steps", "2"])
    assert code == 0, err
    assert "Traceback" not in err
    assert "distillation: 2 steps at peak rate 0.0003" in out  # the merge-only default
    config = json.loads((out_dir / "config.json").read_text())
    assert config["mcsmoe"]["distillation"]["lr"] == 3e-4 and config["mcsmoe"]["recipe"]["distill_lr"] is None
    assert not (out_dir / "stale.txt").exists()
    assert not list(tmp_path.glob(".out.*")), "staging folder left behind"


def test_output_parent_missing(tiny_dirs, tmp_path, capsys):
    out_dir = tmp_path / "no_such_parent" / "out"
    code, out, err = run(capsys, ["compress", tiny_dirs["mixtral"], out_dir, *FAST])
    assert_one_error_line(code, err, ["parent folder", str(out_dir.parent)])
    assert out == ""
    assert not out_dir.parent.exists()


def _console_script() -> str:
    script = Path(sys.executable).parent / "mcsmoe"
    return str(script) if script.exists() else shutil.which("mcsmoe") or pytest.fail("mcsmoe script not installed")


def test_console_script_help():
    proc = subprocess.run([_console_script(), "compress", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--rank-ratio" in proc.stdout
    assert "--experts" in proc.stdout


def test_console_script_missing_model(tmp_path):
    missing, out_dir = tmp_path / "no_such_model", tmp_path / "out"
    proc = subprocess.run([_console_script(), "compress", str(missing), str(out_dir), *FAST],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert_one_error_line(proc.returncode, proc.stderr, ["model directory not found", str(missing)])
    assert_nothing_written(out_dir)


def test_strategy_flags_offer_what_the_registries_hold(capsys):
    from mcsmoe_deploy import GROUPINGS, register_grouping
    from mcsmoe_deploy.cli import build_parser

    register_grouping("every-expert-alone")(lambda layer, num_groups, context: None)
    try:
        args = build_parser().parse_args(["compress", "in", "out", "--grouping", "every-expert-alone",
                                          "--activation-aware", "--weighting", "uniform"])
    finally:
        del GROUPINGS["every-expert-alone"]
    assert (args.grouping, args.low_rank, args.weighting) == ("every-expert-alone", "activation-aware", "uniform")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "in", "out", "--grouping", "every-expert-alone"])
    assert "invalid choice: 'every-expert-alone' (choose from 'similarity', 'random', 'drop', 'hc', 'reap')" in capsys.readouterr().err
