"""Quantizing beyond the experts (quant_scope "all"): QuantizedLinear computes x @ dequantize(W).T + b exactly,
checkpoints record and rebuild it, and the exported graph holds DequantizeLinear + MatMul that onnxruntime fuses
to MatMulNBits, matching the torch model within 1e-4 relative."""

from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import mcsmoe_deploy as m
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.compress import CalibratedModel
from mcsmoe_deploy.contract import DOMAIN
from mcsmoe_deploy.exporters import pipeline
from mcsmoe_deploy.quantization import QuantSpec, dequantize, quantize
from mcsmoe_deploy.quantized_linear import QuantizedLinear
from mcsmoe_deploy.runtime.ort_session import load_session, session_options

from conftest import model_inputs

DECODERS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FAST = dict(max_calib_tokens=1024, calib_seq_len=32)
SPECS = [QuantSpec(4, 16), QuantSpec(4, 16, symmetric=False), QuantSpec(8, 32)]


@pytest.mark.parametrize("spec", SPECS, ids=["int4", "int4-asym", "int8"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_quantized_linear_is_x_times_the_dequantized_weight_plus_bias(spec, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24, bias=bias)
    layer = QuantizedLinear.from_linear(linear, spec)
    x = torch.randn(2, 5, 64)
    weight = dequantize(quantize(linear.weight.detach(), spec))
    expected = x @ weight.T + (linear.bias.detach() if bias else 0)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    assert torch.equal(layer.dequantized_weight(), weight)
    assert layer.weight_codes.dtype == torch.uint8 and tuple(layer.weight_codes.shape) == (24, 64 * spec.bits // 8)
    assert tuple(layer.weight_scales.shape) == (24, 64 // spec.block)
    names = set(layer.state_dict())
    assert ("weight_zero_points" in names) == (not spec.symmetric) and ("bias" in names) == bias
    assert "weight" not in names


def test_a_block_that_does_not_divide_a_linear_layer_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(48, 8))
    with pytest.raises(m.UserError, match="quantization block 32 does not divide the input size 48 of 0$"):
        m.quantize_linears(model, ["0"], QuantSpec(4, 32))
    assert isinstance(model[0], nn.Linear)


def _expected_linears(family: str, layers: int = 2) -> set[str]:
    per_layer = [f"self_attn.{p}_proj" for p in "qkvo"]
    if family == "qwen2_moe":
        per_layer += [f"mlp.shared_expert.{p}_proj" for p in ("gate", "up", "down")] + ["mlp.shared_expert_gate"]
    return {"lm_head"} | {f"model.layers.{i}.{name}" for i in range(layers) for name in per_layer}


def _optimized_graph(path, tmp_path) -> onnx.ModelProto:
    optimized = tmp_path / "optimized.onnx"
    load_session(path, "cpu", session_options(opt_level="all", optimized_model_path=optimized))
    return onnx.load(str(optimized), load_external_data=False)


@pytest.mark.parametrize("family", DECODERS)
def test_scope_all_checkpoint_reloads_exactly_and_exports_to_matmul_nbits(family, tiny_dirs, tmp_path):
    recipe = m.CompressionRecipe(experts=4, quantize="int4", quant_block=16, **FAST)
    assert recipe.quant_scope == "all" and not recipe.quant_symmetric  # asymmetric by default
    source = CalibratedModel(tiny_dirs[family], recipe, progress=False)
    compressed = source.compress(in_place=True)
    source.quantize(compressed)
    out = source.save(compressed, tmp_path / "q")

    section = json.loads((out / "config.json").read_text())["mcsmoe"]
    assert set(section["quantized_linears"]) == _expected_linears(family)  # no router, no embedding
    assert all(spec == {"bits": 4, "block": 16, "symmetric": False} for spec in section["quantized_linears"].values())
    assert m.is_quantized_checkpoint(out)
    reloaded = m.load_compressed(out)
    assert isinstance(reloaded.lm_head, QuantizedLinear)
    assert isinstance(reloaded.get_input_embeddings(), nn.Embedding)  # embeddings stay float
    with torch.no_grad():
        inputs = model_inputs(family)
        assert torch.equal(reloaded(**inputs).logits, compressed.model(**inputs).logits)

    graph_path = tmp_path / "model.onnx"
    report = m.export_model(out, graph_path, target="portable", inline=True)  # standard ops: the inlined copy too
    assert len(report.parity) == 2
    for check in report.parity:  # prefill and decode steps, MatMulNBits accuracy level 0
        assert check.with_past and check.max_rel_error < 1e-4, check

    graph = onnx.load(str(graph_path), load_external_data=False)
    assert {i.domain for i in graph.opset_import} == {"", DOMAIN}  # the placeholder domain is gone
    assert all(node.domain in ("", DOMAIN) for node in graph.graph.node)
    assert {i.domain: i.version for i in graph.opset_import}[""] == 21
    initializers = {t.name: t for t in graph.graph.initializer}
    for name in _expected_linears(family):  # transposed uint4 codes [in, out] (asymmetric); no float copy of the weight
        q = initializers[f"model.{name}.weight.q"]
        assert q.data_type == onnx.TensorProto.UINT4
        assert f"model.{name}.weight" not in initializers and f"model.{name}.weight_codes" not in initializers
    assert tuple(initializers["model.lm_head.weight.q"].dims) == (32, 320)

    fused = {node.input[1] for node in _optimized_graph(graph_path, tmp_path).graph.node
             if node.op_type == "MatMulNBits"}
    for name in _expected_linears(family):
        assert any(part.startswith(f"model.{name}.weight.q") for b in fused for part in b.split("+")), name

    inlined = onnx.load(report.inlined_path, load_external_data=False)
    assert {node.domain for node in inlined.graph.node} <= {""}
    assert {i.domain for i in inlined.opset_import} == {""}


@pytest.mark.parametrize("family", ("mixtral", "qwen3_moe"))
def test_quantized_projections_feed_the_fused_attention_of_target_ort(family, tiny_dirs, tmp_path):
    # target ort (the default): q/k/v/o are DequantizeLinear + MatMul feeding GroupQueryAttention
    graph_path = tmp_path / "model.onnx"
    report = m.export_model(tiny_dirs[family], graph_path, quantize="int4", quant_block=16)
    assert all(check.max_rel_error < 1e-4 for check in report.parity), report.parity
    ops = [node.op_type for node in _optimized_graph(graph_path, tmp_path).graph.node]
    assert ops.count("GroupQueryAttention") == 2
    fused = {node.input[1] for node in _optimized_graph(graph_path, tmp_path).graph.node
             if node.op_type == "MatMulNBits"}
    for name in _expected_linears(family):
        assert any(part.startswith(f"model.{name}.weight.q") for b in fused for part in b.split("+")), name


def test_export_quantizes_a_dense_checkpoint_and_validates_against_it(tiny_dirs, tmp_path, returned_by, capsys):
    reports = returned_by(pipeline, "export_model")
    out = tmp_path / "model.onnx"
    assert main(["export", str(tiny_dirs["qwen2_moe"]), str(out), "--quantize", "int4", "--quant-block", "16",
                 "--quant-asymmetric", "--quiet"]) == 0
    (report,) = reports
    assert report.parity and all(check.max_rel_error < 1e-4 for check in report.parity)
    graph = onnx.load(str(out), load_external_data=False)
    # as written (target ort), with zero points: the routed experts one QMoE per layer (group-weights routing:
    # Qwen2-MoE does not renormalise its top-k), and the 17 other linear layers as 9 MatMulNBits: per layer
    # q/k/v packed, o, the shared expert's gate, up and gate (one activation: one node), its down; the LM head
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 4 + 1 and all(len(n.input) == 4 for n in nbits)
    qmoe = [n for n in graph.graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == 2 and all(n.input[11] and n.input[12] for n in qmoe)  # fc1, fc2 zero points
    assert not Counter(t.data_type for t in graph.graph.initializer)[onnx.TensorProto.UINT4]
    assert Counter(n.op_type for n in _optimized_graph(out, tmp_path).graph.node)["MatMulNBits"] == len(nbits)


def test_export_scope_experts_keeps_attention_float(tiny_dirs, tmp_path):
    out = tmp_path / "model.onnx"
    report = m.export_model(tiny_dirs["mixtral"], out, with_past=False, quantize="int8", quant_block=16,
                            quant_scope="experts", quant_symmetric=True)
    assert report.parity[0].max_rel_error < 1e-4
    graph = onnx.load(str(out), load_external_data=False).graph
    initializers = graph.initializer
    quantized = [n.input[1] for n in graph.node if n.op_type == "MatMulNBits"]  # target ort writes them
    # 8 experts x 2 layers: gate and up (one activation) as one node, down
    assert len(quantized) == 8 * 2 * 2 and all(".experts.projections." in name for name in quantized)
    # the float LM head, transposed by torch.onnx's constant folding
    assert any(t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) == (32, 320) for t in initializers)


@pytest.mark.parametrize("source, extra, message", [
    ("mixtral", ["--quantize", "int3"], "--quantize must be one of int4, int8, not 'int3'"),
    ("mixtral", ["--quantize", "int4", "--quant-block", "64"],
     "--quant-block 64 does not divide the input size 32 of model.layers.0.mlp.experts.projections.gate.weight; "
     "16 divides every one"),
    ("mixtral", ["--quantize", "int4", "--quant-block", "24"], "--quant-block must be a power of two >= 16, not 24"),
    ("mixtral", ["--quantize", "int4", "--quantize-scope", "some"],
     "--quantize-scope must be one of all, all+embeddings, experts, not 'some'"),
    ("mixtral", ["--quantize", "int4", "--target", "ort-fused"], "target 'ort-fused' maps dense float experts"),
    ("mixtral", ["--quantize", "int4", "--accuracy-level", "3"],
     "--accuracy-level must be 4 (int8 activations) or 0 (float32 compute), not 3"),
    ("mixtral", ["--quantize", "int4", "--expert-accuracy-level", "1"],
     "--expert-accuracy-level must be 4 (int8 activations) or 0 (float32 compute), not 1"),
    ("switch_transformers", ["--quantize", "int4"], "quantized export is built for decoder-only families"),
    ("quantized", ["--quantize", "int4", "--quant-block", "16"], "is already quantized; export it without --quantize"),
])
def test_bad_export_quantization_is_one_line_and_writes_nothing(source, extra, message, tiny_dirs, tmp_path, capsys):
    if source == "quantized":
        recipe = m.CompressionRecipe(experts=4, quantize="int4", quant_block=16, quant_scope="experts", **FAST)
        m.compress_model(tiny_dirs["mixtral"], tmp_path / "quantized", recipe, progress=False)
        model_dir = tmp_path / "quantized"
    else:
        model_dir = tiny_dirs[source]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(model_dir), str(tmp_path / "out.onnx"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
