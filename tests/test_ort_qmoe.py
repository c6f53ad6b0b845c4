"""`--target ort-qmoe`: quantized dense SwiGLU blocks as onnxruntime's com.microsoft.QMoE, matching load_compressed.

int4 (symmetric or not, dense or merged, renormalised top-k or not) is exact up to float32 rounding
(accuracy level 0). Blockwise int8 QMoE has no float32 kernel in onnxruntime 1.32: it quantizes
activations to int8, the arithmetic of MatMulNBits at accuracy level 4, so int8 graphs are held to
our own int8 graph run at accuracy level 4 (1e-4) instead of to the float32 reference.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import mcsmoe_deploy as m
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.contract import DOMAIN
from mcsmoe_deploy.errors import UserError
from mcsmoe_deploy.exporters.passes import GraphPassError, GraphPassManager
from mcsmoe_deploy.exporters.passes.ort_qmoe import ORT_DOMAIN, ORT_QMOE, ort_qmoe_passes, plan_qmoe
from mcsmoe_deploy.runtime.ort_session import OrtDecoderSession, session_options
from mcsmoe_deploy.runtime.parity import Discrepancy, compare_decoders
from mcsmoe_deploy.runtime.torch_session import TorchDecoderSession

from conftest import EXPERTS, HIDDEN, INTERMEDIATE, LAYERS, VOCAB

CALIB = dict(max_calib_tokens=1024, calib_seq_len=32, quant_block=16)
QUANT = {"int4": dict(quantize="int4", quant_symmetric=True), "int4-asym": dict(quantize="int4", quant_symmetric=False),
         "int8": dict(quantize="int8", quant_symmetric=True)}
# (family, quantization, groups): dense G = E, merged G = E / 2, and G = 1 < top_k (the kernel's k becomes 1)
CASES = [("mixtral", "int4", EXPERTS), ("mixtral", "int4", EXPERTS // 2), ("mixtral", "int4-asym", EXPERTS),
         ("mixtral", "int4", 1), ("qwen2_moe", "int4", EXPERTS // 2), ("olmoe", "int4", EXPERTS),
         ("qwen3_moe", "int4-asym", EXPERTS // 2)]


def _compress(source, out, quant: str | None, groups: int, **recipe):
    m.compress_model(source, out, m.CompressionRecipe(experts=groups, **CALIB, **QUANT.get(quant, {}), **recipe),
                     progress=False)
    return out


def _qmoe_nodes(path) -> list[onnx.NodeProto]:
    graph = onnx.load(str(path), load_external_data=False)
    assert all(node.domain != DOMAIN for node in graph.graph.node)
    assert not graph.functions and DOMAIN not in {i.domain for i in graph.opset_import}
    return [node for node in graph.graph.node if (node.domain, node.op_type) == (ORT_DOMAIN, ORT_QMOE)]


def _max_rel_error(path, runner, accuracy_level: int, seed: int = 0) -> float:
    """Prefill and one decode step of random tokens, as validate.compare_logits_with_past, at `accuracy_level`."""
    session = OrtDecoderSession(path, provider="cpu", matmul_accuracy_level=accuracy_level)
    generator = torch.Generator().manual_seed(seed)
    worst = Discrepancy()
    for batch, length in ((1, 5), (2, 9)):
        ids = torch.randint(0, VOCAB, (batch, length + 1), generator=generator).numpy()
        worst = worst.worst(compare_decoders(session, runner, ids[:, :length], ids[:, length:]))
    return worst.max_rel_error


@pytest.mark.parametrize("family,quant,groups", CASES, ids=[f"{f}-{q}-g{g}" for f, q, g in CASES])
def test_qmoe_graph_matches_load_compressed(family, quant, groups, tiny_dirs, tmp_path):
    model_dir = _compress(tiny_dirs[family], tmp_path / "q", quant, groups)
    out = tmp_path / "model.onnx"
    report = m.export_model(model_dir, out, target="ort-qmoe")
    assert report.target == "ort-qmoe" and len(report.parity) == 1
    assert report.parity[0].with_past and report.parity[0].max_rel_error < 1e-4, report.parity

    nodes = _qmoe_nodes(out)
    assert len(nodes) == LAYERS
    graph = onnx.load(str(out))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    bits, block = (8, 16) if quant == "int8" else (4, 16)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["expert_weight_bits"] == bits and attrs["block_size"] == block and attrs["swiglu_fusion"] == 1
        assert attrs["k"] == min(2, groups)
        fc1, fc1_scales, fc2 = (weights[node.input[i]] for i in (2, 3, 5))
        assert fc1.dtype == np.uint8 and fc1.shape == (groups, 2 * INTERMEDIATE, HIDDEN * bits // 8)
        assert fc1_scales.shape == (groups, 2 * INTERMEDIATE, HIDDEN // block)
        assert fc2.shape == (groups, HIDDEN, INTERMEDIATE * bits // 8)
        asymmetric = quant.endswith("asym")
        assert (len(node.input) > 11 and node.input[11] != "") == asymmetric  # fc1 zero points
        # dense renormalised (Mixtral): the router logits as they are; otherwise group weights, also as mixing weights
        direct = family == "mixtral" and groups == EXPERTS
        assert (len(node.input) > 14 and node.input[14] != "") == (not direct)
    ops = Counter(node.op_type for node in graph.graph.node)
    assert ops["TopK"] == (0 if family == "mixtral" and groups == EXPERTS else LAYERS)
    if family == "qwen2_moe":  # the shared expert stays outside the node: its gate's sigmoid is still there
        assert ops["Sigmoid"] >= LAYERS


@pytest.mark.parametrize("groups", [EXPERTS, EXPERTS // 2], ids=["dense", "merged"])
def test_int8_qmoe_is_our_int8_graph_at_int8_activation_accuracy(groups, tiny_dirs, tmp_path):
    # experts only: int8 attention would run at level 4 in `ours` and at level 0 in the QMoE graph's check
    model_dir = _compress(tiny_dirs["mixtral"], tmp_path / "q", "int8", groups, quant_scope="experts")
    qmoe, ours = tmp_path / "qmoe.onnx", tmp_path / "ours.onnx"
    report = m.export_model(model_dir, qmoe, target="ort-qmoe")
    m.export_model(model_dir, ours, validate=False)
    assert len(_qmoe_nodes(qmoe)) == LAYERS
    runner = TorchDecoderSession.from_model(m.load_compressed(model_dir))
    # the error of our graph with int8 activations (level 4), far above its float32 error (level 0)
    ours_int8 = _max_rel_error(ours, runner, accuracy_level=4)
    assert abs(report.parity[0].max_rel_error - ours_int8) < 1e-4 * max(ours_int8, 1.0)
    assert _max_rel_error(ours, runner, accuracy_level=0) < 1e-4 < report.parity[0].max_rel_error
    # and step by step the same logits as our graph at level 4
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1)).numpy()
    sessions = [OrtDecoderSession(path, provider="cpu", matmul_accuracy_level=level) for path, level in
                ((qmoe, 0), (ours, 4))]
    assert compare_decoders(*sessions, ids[:, :6], ids[:, 6:]).max_rel_error < 1e-4


def test_removed_experts_and_shared_groups_route_exactly(tiny_dirs, tmp_path):
    """A merged graph whose expert_to_group sends 4 experts to group 0 and removes one: the function body
    (the op's reference semantics) and QMoE agree, so picks landing in one group add and removed picks drop."""
    model_dir = _compress(tiny_dirs["mixtral"], tmp_path / "q", "int4", EXPERTS // 2)
    ours = tmp_path / "ours.onnx"
    # portable: the op's node and function body (target ort inlines quantized nodes into MatMulNBits)
    m.export_model(model_dir, ours, with_past=False, validate=False, target="portable")
    model = ir.load(ours)
    for node in model.graph:
        if node.domain == DOMAIN:
            e2g = node.inputs[2]
            e2g.const_value = ir.Tensor(np.array([0, 0, 0, 0, 1, -1, 2, 3], np.int64), name=e2g.name)
    ir.save(model, ours)
    # float32 compute (the session entry below reaches only the MatMulNBits onnxruntime fuses itself)
    fused = GraphPassManager(ort_qmoe_passes(accuracy_level=0))(ir.load(ours)).model
    assert [f.routing for f in plan_qmoe(ir.load(ours))] == ["group-weights"] * LAYERS
    qmoe = tmp_path / "qmoe.onnx"
    ir.save(fused, qmoe)
    import onnxruntime as ort

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2)).numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    options = session_options(opt_level="all", matmul_accuracy_level=0)
    got, expected = (ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds)[0] for p in (qmoe, ours))
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()


@pytest.fixture(scope="module")
def refused_dirs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("qmoe-refused")
    return {
        "lowrank": _compress(tiny_dirs["mixtral"], root / "lowrank", "int4", 4, rank_ratio=0.5),
        "float": _compress(tiny_dirs["mixtral"], root / "float", None, 4),
        "dense": tiny_dirs["mixtral"],
    }


@pytest.mark.parametrize("case,message", [
    ("lowrank", "low rank (rank 16); QMoE takes dense experts"), ("float", "in float; QMoE takes quantized experts"),
    ("dense", "it is not compressed")])
def test_unsuitable_checkpoints_are_refused_in_one_line(case, message, refused_dirs, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    with pytest.raises(UserError) as error:
        m.export_model(refused_dirs[case], out, target="ort-qmoe")
    assert "\n" not in str(error.value) and message in str(error.value) and "ort-qmoe" in str(error.value)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(["export", str(refused_dirs[case]), str(out), "--target", "ort-qmoe", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_plain_experts_are_refused_in_one_line():
    config = m.ExportConfig(target="ort-qmoe")
    with pytest.raises(UserError, match="needs a quantized checkpoint with SwiGLU experts; switch_transformers "
                                        "experts are plain relu"):
        config.check_experts("switch_transformers", m.ExpertLayout(False, "relu", HIDDEN, INTERMEDIATE))


def test_the_pass_refuses_a_low_rank_graph_and_leaves_it_unchanged(refused_dirs, tmp_path):
    ours = tmp_path / "ours.onnx"
    m.export_model(refused_dirs["lowrank"], ours, with_past=False, validate=False, target="portable")
    model = ir.load(ours)
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(GraphPassError, match="projection (gate|up|down) is 'lowrank-[a-z-]*int4b16', not dense and "
                                             "quantized"):
        GraphPassManager(ort_qmoe_passes())(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_the_target_runs_the_fusion_then_the_clean_up_then_folds_residual_adds():
    names = [type(p).__name__ for p in m.ExportConfig(target="ort-qmoe").graph_passes()]
    assert names == ["StripTraceMetadataPass", "FuseQMoEPass", "RemoveUnusedNodesPass", "RemoveUnusedFunctionsPass",
                     "RemoveUnusedOpsetsPass", "SkipMoEReshapesPass", "PackedQKVPass", "SkipNormFusionPass",
                     "MatMulNBitsPass", "FuseSiblingMatMulNBitsPass"]
