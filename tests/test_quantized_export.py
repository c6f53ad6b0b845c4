"""Quantized checkpoints export: com.microsoft.MatMulNBits under target ort (the default), per-group
DequantizeLinear + MatMul (that onnxruntime fuses to MatMulNBits) under target portable, matching
`load_compressed` within 1e-4 relative (prefill and decode), inlined and not."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

import mcsmoe_deploy as m
from mcsmoe_deploy.contract import DOMAIN, QUANTIZED_OP_VERSION
from mcsmoe_deploy.errors import UserError
from mcsmoe_deploy.runtime import GenerationConfig, generate, open_session
from mcsmoe_deploy.runtime.ort_session import load_session, session_options

FAST = dict(experts=4, max_calib_tokens=1024, calib_seq_len=32, quant_block=16)
LOW_RANK = dict(rank_ratio=0.5, sparse_keep=0.1)
QUANT = {"int4": dict(quantize="int4", quant_symmetric=True), "int4-asym": dict(quantize="int4", quant_symmetric=False),
         "int8": dict(quantize="int8", quant_symmetric=True)}
DECODERS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# every family: int4 symmetric merged and int4 asymmetric low rank + sparse; Mixtral: the rest of the matrix
CASES = [(family, "int4", False) for family in DECODERS] + [(family, "int4-asym", True) for family in DECODERS] + [
    ("mixtral", "int4-asym", False), ("mixtral", "int4", True), ("mixtral", "int8", False), ("mixtral", "int8", True)]
PROMPTS = [[5, 17, 99, 3, 250, 41], [7, 8, 9]]


def _compress(source, out, quant: str, low_rank: bool):
    recipe = m.CompressionRecipe(**FAST, **QUANT[quant], **(LOW_RANK if low_rank else {}))
    m.compress_model(source, out, recipe, progress=False)
    return out


def _optimized_ops(path, tmp_path) -> Counter:
    """Op types of onnxruntime's optimised graph of `path` (all optimisations, CPU)."""
    optimized = tmp_path / "optimized.onnx"
    load_session(path, "cpu", session_options(opt_level="all", optimized_model_path=optimized))
    return Counter(node.op_type for node in onnx.load(str(optimized), load_external_data=False).graph.node)


@pytest.mark.parametrize("family,quant,low_rank", CASES, ids=[f"{f}-{q}-{'lowrank' if lr else 'merged'}"
                                                             for f, q, lr in CASES])
def test_quantized_graph_matches_load_compressed_and_fuses(family, quant, low_rank, tiny_dirs, tmp_path):
    model_dir = _compress(tiny_dirs[family], tmp_path / "q", quant, low_rank)
    out = tmp_path / "model.onnx"
    report = m.export_model(model_dir, out, inline=True)
    # parity of both files against load_compressed, prefill and decode steps (accuracy level 0)
    assert len(report.parity) == 2
    for check in report.parity:
        assert check.with_past and check.max_rel_error < 1e-4, check

    # target ort: every quantized weight is MatMulNBits' own uint8 layout, nothing left for onnxruntime to copy
    graph = onnx.load(str(out), load_external_data=False)
    ops = Counter(node.op_type for node in graph.graph.node)
    assert ops["MatMulNBits"] > 0 and "DequantizeLinear" not in ops and "GroupedLowRankMoE" not in ops
    kinds = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8}
    assert not any(t.data_type in kinds for t in graph.graph.initializer)

    inlined = onnx.load(report.inlined_path, load_external_data=False)
    assert all(node.domain != DOMAIN for node in inlined.graph.node)
    assert DOMAIN not in {i.domain for i in inlined.opset_import}

    if (quant, low_rank) in (("int4", False), ("int4-asym", True)):  # portable: the op, standard ops, fused by onnxruntime
        portable = tmp_path / "portable.onnx"
        report = m.export_model(model_dir, portable, target="portable")
        assert all(check.max_rel_error < 1e-4 for check in report.parity)
        graph = onnx.load(str(portable), load_external_data=False)
        assert {i.domain: i.version for i in graph.opset_import}[DOMAIN] == QUANTIZED_OP_VERSION
        assert any(t.data_type in kinds | {onnx.TensorProto.UINT8} for t in graph.graph.initializer)
        assert "MatMulNBits" in _optimized_ops(portable, tmp_path)

    if (quant, low_rank) == ("int4", False):  # greedy tokens: the fused ORT session vs the torch reference
        config = GenerationConfig(max_new_tokens=8)
        ort_tokens = generate(open_session(out, matmul_accuracy_level=0), PROMPTS, config).tokens
        assert ort_tokens == generate(open_session(model_dir, backend="torch"), PROMPTS, config).tokens


def test_default_accuracy_level_is_close_and_level_0_is_exact(tiny_dirs, tmp_path):
    """onnxruntime's default MatMulNBits accuracy (int8 activations) is close; level 0 matches float32."""
    model_dir = _compress(tiny_dirs["mixtral"], tmp_path / "q", "int4", False)
    out = tmp_path / "model.onnx"
    m.export_model(model_dir, out, validate=False)
    config = GenerationConfig(max_new_tokens=1)
    logits = {level: generate(open_session(out, matmul_accuracy_level=level), [PROMPTS[0]], config,
                              keep_logits=True).logits[0] for level in (None, 0)}
    reference = generate(open_session(model_dir, backend="torch"), [PROMPTS[0]], config, keep_logits=True).logits[0]
    scale = np.abs(reference).max()
    assert np.abs(logits[0] - reference).max() / scale < 1e-4
    assert np.abs(logits[None] - reference).max() / scale < 5e-2


def test_ort_fused_target_refuses_a_quantized_checkpoint_in_one_line(tiny_dirs, tmp_path):
    model_dir = _compress(tiny_dirs["mixtral"], tmp_path / "q", "int4", False)
    with pytest.raises(UserError) as error:
        m.export_model(model_dir, tmp_path / "model.onnx", target="ort-fused")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "model.onnx").exists()
