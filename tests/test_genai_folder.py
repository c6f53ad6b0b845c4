"""`mcsmoe-export --genai DIR`: an onnxruntime-genai model folder that generates our tokens.

onnxruntime-genai is a test-only dependency (the `test` extra); the package only writes the folder.
Each case compares onnxruntime_genai's greedy search on the folder with `mcsmoe run`'s decode loop
(`runtime.generate` over an onnxruntime session) on the same graph: the tokens must be equal.
"""

from __future__ import annotations

import json

import pytest

import mcsmoe_deploy as m
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.corpus import TOKENIZER_FILES, TOKENIZER_SIDE_FILES
from mcsmoe_deploy.runtime import GenerationConfig, generate, open_session

og = pytest.importorskip(
    "onnxruntime_genai", reason="onnxruntime-genai (test-only dependency, the `test` extra) is not installed")

DECODERS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
PROMPTS = ([5, 17, 99, 3, 250, 41], [7, 8, 9], [200, 1, 64, 33])
NEW_TOKENS = 12
COMPRESSED = {"merged": dict(experts=2), "low-rank": dict(experts=2, rank_ratio=0.5, sparse_keep=0.1),
              "int4": dict(experts=4, quantize="int4", quant_block=16)}


def _genai_tokens(folder, prompt: list[int], eos: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + NEW_TOKENS)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]


def _our_tokens(graph, prompt: list[int], eos: int) -> list[int]:
    session = open_session(graph)
    try:
        result = generate(session, [prompt], GenerationConfig(max_new_tokens=NEW_TOKENS, stop_token_ids=(eos,)))
    finally:
        session.close()
    return result.tokens[0]


def _export_genai(source, folder) -> None:
    assert main(["export", str(source), "--genai", str(folder), "--quiet"]) == 0


def _assert_same_tokens(folder) -> None:
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    for prompt in PROMPTS:
        assert _genai_tokens(folder, prompt, eos) == _our_tokens(folder / "model.onnx", prompt, eos), prompt


def _with_config(source, tmp_path, **values):
    """A copy of checkpoint `source` whose config.json and generation_config.json have `values`."""
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(source, copy)
    for name in ("config.json", "generation_config.json"):
        if (copy / name).exists():
            config = json.loads((copy / name).read_text())
            (copy / name).write_text(json.dumps({**config, **values}))
    return copy


@pytest.mark.parametrize("family", DECODERS)
def test_dense_genai_folder_generates_our_tokens(family, tiny_dirs, tmp_path):
    folder = tmp_path / "genai"
    source = tiny_dirs[family]
    if family == "olmoe":  # transformers' OLMoE defaults (eos 50279, pad 1) are beyond the tiny vocabulary
        source = _with_config(source, tmp_path, eos_token_id=256, pad_token_id=256)
    _export_genai(source, folder)
    names = {p.name for p in folder.iterdir()}
    assert {"genai_config.json", "model.onnx", "tokenizer.json"} <= names
    assert names - {"genai_config.json", "model.onnx"} <= {*TOKENIZER_FILES, *TOKENIZER_SIDE_FILES}
    config = json.loads((folder / "genai_config.json").read_text())
    source = json.loads((source / "config.json").read_text())
    decoder = config["model"]["decoder"]
    heads = source["num_attention_heads"]
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"], decoder["hidden_size"]) == (
        source["num_hidden_layers"], heads, source["num_key_value_heads"],
        source.get("head_dim") or source["hidden_size"] // heads, source["hidden_size"])
    assert config["model"]["vocab_size"] == source["vocab_size"]
    assert config["model"]["context_length"] == source["max_position_embeddings"]
    assert config["search"]["past_present_share_buffer"] is False
    _assert_same_tokens(folder)


@pytest.mark.parametrize("kind", list(COMPRESSED))
def test_compressed_genai_folder_generates_our_tokens(kind, tiny_dirs, tmp_path):
    recipe = m.CompressionRecipe(max_calib_tokens=1024, calib_seq_len=32, **COMPRESSED[kind])
    m.compress_model(tiny_dirs["mixtral"], tmp_path / "c", recipe, progress=False)
    folder = tmp_path / "genai"
    _export_genai(tmp_path / "c", folder)
    _assert_same_tokens(folder)


def test_genai_search_defaults_come_from_generation_config(tiny_dirs, tmp_path):
    import shutil

    source = tmp_path / "src"
    shutil.copytree(tiny_dirs["mixtral"], source)
    (source / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_length": 64, "eos_token_id": [3, 4],
         "bos_token_id": 1}))
    folder = tmp_path / "genai"
    report = m.export_model(source, folder, genai=True, validate=False)
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["search"]["do_sample"] is True and config["search"]["temperature"] == 0.7
    assert config["search"]["top_p"] == 0.9 and config["search"]["max_length"] == 64
    assert config["model"]["eos_token_id"] == [3, 4] and config["model"]["bos_token_id"] == 1
    assert report.path == str(folder / "model.onnx")
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_genai_refuses_switch_in_one_line(tiny_dirs, tmp_path, capsys):
    assert main(["export", str(tiny_dirs["switch_transformers"]), "--genai", str(tmp_path / "g"), "--quiet"]) != 0
    assert "onnxruntime-genai runs decoder-only graphs" in _one_error_line(capsys)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("args,message", [
    (["--no-past"], "needs the KV-cache graph"),
    (["OUT"], "one of them"),
    ([], "give a folder name, not g.onnx"),
])
def test_genai_bad_options_fail_in_one_line(args, message, tiny_dirs, tmp_path, capsys):
    genai_dir = tmp_path / ("g.onnx" if not args else "g")
    extra = [str(tmp_path / "x.onnx") if a == "OUT" else a for a in args]
    positional = [a for a in extra if a.endswith(".onnx")]
    flags = [a for a in extra if not a.endswith(".onnx")]
    argv = ["export", str(tiny_dirs["mixtral"]), *positional, "--genai", str(genai_dir), "--quiet", *flags]
    assert main(argv) != 0
    assert message in _one_error_line(capsys)
    assert not genai_dir.exists() and not (tmp_path / "x.onnx").exists()


def test_genai_refuses_special_tokens_beyond_the_vocabulary(tiny_dirs, tmp_path, capsys):
    source = _with_config(tiny_dirs["mixtral"], tmp_path, eos_token_id=10**6)
    assert main(["export", str(source), "--genai", str(tmp_path / "g"), "--quiet"]) != 0
    assert "eos_token_id 1000000" in _one_error_line(capsys)
    assert not (tmp_path / "g").exists()


def test_genai_needs_tokenizer_json(tiny_dirs, tmp_path, capsys):
    import shutil

    source = tmp_path / "src"
    shutil.copytree(tiny_dirs["mixtral"], source)
    (source / "tokenizer.json").unlink()
    assert main(["export", str(source), "--genai", str(tmp_path / "g"), "--quiet"]) != 0
    assert "reads tokenizer.json" in _one_error_line(capsys)
