"""Native dtypes. Hub-layout checkpoints (tests/hub_layout.py: sharded bf16 safetensors, legacy expert names) of every
family through compress, load_compressed, export and run, in their own dtype.

- At one expert per group, the compressed checkpoint is bf16 like its source, smaller than it
  (G x the source's expert bytes, no fp32 copy), and load_compressed computes the source model:
  the expert weights are the source's bf16 values bit for bit, so logits agree with transformers'
  bf16 model within bf16 rounding of the computation.
- Merged to 2 groups, the bf16 checkpoint exports to an fp32 graph that matches the fp32 upcast
  of that checkpoint within 1e-4 relative (export's own validation), and the graph generates.
- An fp16 source gives an fp16 checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import mcsmoe_deploy as m
from conftest import EXPERTS
from hub_layout import LEGACY_EXPERT_KEY, save_hub_layout, stored_bytes
from mcsmoe_deploy.runtime import GenerationConfig, generate, open_session

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch_transformers")
CALIBRATION = dict(max_calib_tokens=512, calib_seq_len=32)
# bf16 keeps 8 significant bits: two bf16 computations of the same logits (ours, transformers')
# round differently along the way; 3% of the largest logit bounds that on these models
BF16_RELATIVE = 3e-2


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {family: save_hub_layout(family, root / family) for family in FAMILIES}


def _stored_dtypes(model_dir) -> dict[str, str]:
    """Tensor name -> safetensors dtype over every shard of `model_dir`."""
    dtypes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            dtypes.update({name: str(handle.get_slice(name).get_dtype()) for name in handle.keys()})
    return dtypes


def _logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            decoder_ids = torch.zeros(ids.shape[0], 3, dtype=torch.long)
            return model(input_ids=ids, decoder_input_ids=decoder_ids).logits.float().numpy()
        return model(input_ids=ids).logits.float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_layout_round_trips_in_its_own_dtype(family, hub_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    source = hub_dirs[family]
    assert LEGACY_EXPERT_KEY[family] in _stored_dtypes(source)  # the hub's names, not transformers 5's stacked ones
    out = tmp_path / "c"
    result = m.compress_model(source, out, m.CompressionRecipe(experts=EXPERTS, **CALIBRATION), progress=False)

    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    floating = {name: dtype for name, dtype in _stored_dtypes(out).items() if dtype.startswith(("F", "BF"))}
    assert set(floating.values()) == {"BF16"}, floating
    assert stored_bytes(out) < stored_bytes(source)
    assert result.before.total_bytes < stored_bytes(source) < 1.1 * result.before.total_bytes  # bf16 bytes, not fp32

    auto = AutoModelForSeq2SeqLM if family == "switch_transformers" else AutoModelForCausalLM
    reference = auto.from_pretrained(source, dtype=torch.bfloat16).eval()
    compressed = m.load_compressed(out)
    assert next(compressed.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, reference.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    expected, actual = _logits(reference, ids), _logits(compressed, ids)
    assert np.abs(actual - expected).max() <= BF16_RELATIVE * np.abs(expected).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_layout_merged_exports_and_runs(family, hub_dirs, tmp_path):
    out = tmp_path / "c"
    m.compress_model(hub_dirs[family], out, m.CompressionRecipe(experts=2, **CALIBRATION), progress=False)
    assert stored_bytes(out) < 0.75 * stored_bytes(hub_dirs[family])
    graph = tmp_path / ("onnx" if family == "switch_transformers" else "model.onnx")
    report = m.export_model(out, graph)
    assert report.max_rel_error is not None and report.max_rel_error < 1e-4

    session = open_session(graph)
    try:
        config = GenerationConfig(max_new_tokens=4)
        if family == "switch_transformers":
            ids = np.array([[5, 17, 99, 3]], dtype=np.int64)
            decoder = session.decoder(session.encode(ids, np.ones_like(ids)))
            tokens = generate(decoder, [[0]], config).tokens[0]
        else:
            tokens = generate(session, [[5, 17, 99, 3]], config).tokens[0]
    finally:
        session.close()
    assert len(tokens) == 4


def test_fp16_source_gives_an_fp16_checkpoint(tmp_path):
    source = save_hub_layout("mixtral", tmp_path / "src", dtype=torch.float16, shards=2)
    out = tmp_path / "c"
    m.compress_model(source, out, m.CompressionRecipe(experts=2, **CALIBRATION), progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert {d for d in _stored_dtypes(out).values() if d.startswith(("F", "BF"))} == {"F16"}
    assert m.load_compressed(out).model.embed_tokens.weight.dtype == torch.float16


# fp16 graphs against the fp32 reference: fp16 keeps 11 significant bits, and a routing decision
# that flips on a near tie moves a token's logits further; 1e-2 of the largest logit bounds both here
FP16_RELATIVE = 1e-2


@pytest.mark.parametrize("family", ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"))
def test_fp16_graph_matches_the_fp32_reference_at_fp16_tolerance(family, hub_dirs, tmp_path):
    import onnx

    out = tmp_path / "c"
    m.compress_model(hub_dirs[family], out, m.CompressionRecipe(experts=2, rank_ratio=0.5, **CALIBRATION),
                     progress=False)
    fp32 = m.export_model(out, tmp_path / "fp32.onnx", validate=False)
    fp16 = m.export_model(out, tmp_path / "fp16.onnx", dtype="fp16")
    assert fp16.max_rel_error < FP16_RELATIVE
    assert fp16.file_bytes < fp32.file_bytes

    def weight_bytes(path) -> dict[int, int]:  # ONNX element type -> initializer bytes
        sizes: dict[int, int] = {}
        for tensor in onnx.load(str(path)).graph.initializer:
            sizes[tensor.data_type] = sizes.get(tensor.data_type, 0) + len(tensor.raw_data)
        return sizes

    floating16, floating32 = weight_bytes(tmp_path / "fp16.onnx"), weight_bytes(tmp_path / "fp32.onnx")
    assert floating16.get(onnx.TensorProto.FLOAT, 0) < 100  # a few scalar constants at most
    assert floating16[onnx.TensorProto.FLOAT16] * 2 >= floating32[onnx.TensorProto.FLOAT] - 100
    graph = onnx.load(str(tmp_path / "fp16.onnx"), load_external_data=False).graph
    past = next(i for i in graph.input if i.name.startswith("past_key_values."))
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("family,args,message", [
    ("mixtral", ["--dtype", "bf16"], "bf16 graphs are not offered"),
    ("switch_transformers", ["--dtype", "fp16"], "activations overflow fp16"),
    ("mixtral", ["--dtype", "fp16", "--target", "ort-fused"], "exports fp32 graphs only"),
])
def test_graph_dtypes_refused_in_one_line(family, args, message, hub_dirs, tmp_path, capsys):
    from mcsmoe_deploy.cli import main

    out = tmp_path / ("onnx" if family == "switch_transformers" else "model.onnx")
    assert main(["export", str(hub_dirs[family]), str(out), "--quiet", *args]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_fp16_export_of_a_quantized_checkpoint_is_refused(hub_dirs, tmp_path):
    out = tmp_path / "q"
    m.compress_model(hub_dirs["mixtral"], out, m.CompressionRecipe(experts=2, quantize="int8", quant_block=16,
                                                                   **CALIBRATION), progress=False)
    with pytest.raises(m.UserError, match="export it as fp32"):
        m.export_model(out, tmp_path / "model.onnx", dtype="fp16")
    assert not (tmp_path / "model.onnx").exists()
