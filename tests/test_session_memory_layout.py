"""What keeps onnxruntime sessions near the graph's bytes (issue 12): op version 3's per-group float body,
MatMulNBits written at export (same outputs as DequantizeLinear + MatMul), and reading a graph's
structure without its weight bytes."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mcsmoe_deploy.contract import PER_GROUP_OP_VERSION
from mcsmoe_deploy.exporters import MoEOpSpec, standalone_model
from mcsmoe_deploy.exporters.passes.matmul_nbits import MatMulNBitsPass
from mcsmoe_deploy.grouped_experts import ProjectionSpec
from mcsmoe_deploy.models.base import SOFTMAX_TOPK_NORM
from mcsmoe_deploy.onnx_header import load_without_weight_bytes
from mcsmoe_deploy.summary import format_export

from conftest import LAYERS

H, I, E, G = 16, 24, 4, 2


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]


def test_per_group_body_computes_what_the_stacked_body_does():
    """Version 3 (dense gate, low-rank + sparse up and down) against version 1 on the same weights."""
    projections = (("gate", ProjectionSpec(I, H)), ("up", ProjectionSpec(I, H, rank=4, sparse_rows=3)),
                   ("down", ProjectionSpec(H, I, rank=5, sparse_rows=2)))
    stacked = MoEOpSpec(E, G, H, I, 2, True, "silu", SOFTMAX_TOPK_NORM, projections)
    split = dataclasses.replace(stacked, per_group=True)
    assert stacked.version == 1 and split.version == PER_GROUP_OP_VERSION
    assert split.overload == stacked.overload + "_pergroup"
    rng = np.random.default_rng(0)
    feeds = {"hidden": rng.standard_normal((7, H), dtype=np.float32),
             "router_logits": rng.standard_normal((7, E), dtype=np.float32),
             "expert_to_group": np.array([0, 1, 1, 0], np.int64)}
    for name, shape in stacked.input_shapes().items():
        if name in feeds:
            continue
        feeds[name] = rng.integers(0, shape[1], shape) if name.endswith("_sparse_rows") else \
            rng.standard_normal(shape).astype(np.float32)
    split_feeds = {k: v for k, v in feeds.items() if k in split.input_names()}
    for name, proj in projections:
        for factor in proj.factors:
            split_feeds.update({f"{name}_{factor}_{g}": feeds[f"{name}_{factor}"][g].T for g in range(G)})
    expected = _run(standalone_model(stacked), feeds)
    model = standalone_model(split)
    weights = {f"{name}_{factor}_{g}" for name, proj in projections for factor in proj.factors for g in range(G)}
    body = model.functions[0].node
    assert not [n for n in body if n.op_type in ("Gather", "Transpose") and set(n.input) & weights]
    np.testing.assert_allclose(_run(model, split_feeds), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,block,k", [(TensorProto.INT4, 16, 64), (TensorProto.UINT4, 16, 48),
                                          (TensorProto.INT8, 32, 64), (TensorProto.UINT8, 16, 32)])
def test_matmul_nbits_pass_keeps_the_outputs_of_dequantize_and_matmul(kind, block, k):
    """Blocked DQ + MatMul -> MatMulNBits at accuracy level 0; uint4 with 3 blocks packs an odd zero-point row."""
    n, rng = 8, np.random.default_rng(1)
    bits, signed = {TensorProto.INT4: (4, True), TensorProto.UINT4: (4, False), TensorProto.INT8: (8, True),
                    TensorProto.UINT8: (8, False)}[kind]
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    numpy_type = {TensorProto.INT4: ml_dtypes.int4, TensorProto.UINT4: ml_dtypes.uint4, TensorProto.INT8: np.int8,
                  TensorProto.UINT8: np.uint8}[kind]
    q = rng.integers(low, high, (k, n)).astype(numpy_type)
    scale = rng.uniform(0.01, 0.1, (k // block, n)).astype(np.float32)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "scale")]
    if not signed:
        inits.append(numpy_helper.from_array(rng.integers(0, 1 << bits, (k // block, n)).astype(numpy_type), "zp"))
    nodes = [helper.make_node("DequantizeLinear", [i.name for i in inits], ["w"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = rng.standard_normal((3, k), dtype=np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the standard ops, unfused
    expected = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    fused = ir.to_proto(MatMulNBitsPass(accuracy_level=0)(ir.from_proto(model)).model)
    assert [node.op_type for node in fused.graph.node] == ["MatMulNBits"]
    assert {t.data_type for t in fused.graph.initializer} <= {TensorProto.UINT8, TensorProto.FLOAT}
    np.testing.assert_allclose(_run(fused, {"x": x}), expected, rtol=1e-5, atol=1e-5)


def test_graph_header_is_the_model_without_weight_bytes(tmp_path):
    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.metadata_props.add(key="k", value="v")
    onnx.save(model, tmp_path / "m.onnx")
    header = load_without_weight_bytes(tmp_path / "m.onnx")
    model.graph.initializer[0].ClearField("raw_data")
    assert header.SerializeToString() == model.SerializeToString()
    assert list(header.graph.initializer[0].dims) == [3, 4] and not header.graph.initializer[0].raw_data


def _op_counts(path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {op: sum(n.op_type == op for n in graph.node) for op in ("QMoE", "MatMulNBits", "GroupedLowRankMoE")}


def _largest_inline_tensor(path) -> int:
    return max(len(t.raw_data) for t in onnx.load(str(path), load_external_data=False).graph.initializer)


def test_default_int4_export_is_qmoe_experts_with_external_data(tiny_dirs, tmp_path, capsys):
    """`mcsmoe-export --quantize int4` with default options: dense int4 experts as QMoE (no packed copy in
    the session), the rest MatMulNBits, weights in OUT.onnx.data (memory-mapped by onnxruntime) and
    validated; --no-external-data writes one file of the same graph; a float export stays one file."""
    from mcsmoe_deploy.cli import main_export

    out = tmp_path / "default" / "int4.onnx"
    out.parent.mkdir()
    assert main_export([str(tiny_dirs["mixtral"]), str(out), "--quantize", "int4", "--quant-block", "16"]) == 0
    assert "decode step each: max abs error" in capsys.readouterr().out  # validated
    assert sorted(p.name for p in out.parent.iterdir()) == ["int4.onnx", "int4.onnx.data"]
    assert _largest_inline_tensor(out) <= 1024
    assert _op_counts(out) == {"QMoE": 2, "MatMulNBits": _op_counts(out)["MatMulNBits"], "GroupedLowRankMoE": 0}
    assert _op_counts(out)["MatMulNBits"] > 0  # attention and the LM head

    one_file = tmp_path / "one" / "int4.onnx"
    one_file.parent.mkdir()
    assert main_export([str(tiny_dirs["mixtral"]), str(one_file), "--quantize", "int4", "--quant-block", "16",
                        "--no-external-data", "--no-validate"]) == 0
    assert sorted(p.name for p in one_file.parent.iterdir()) == ["int4.onnx"]
    assert _op_counts(one_file) == _op_counts(out)

    fp32 = tmp_path / "fp32" / "fp32.onnx"
    fp32.parent.mkdir()
    assert main_export([str(tiny_dirs["mixtral"]), str(fp32), "--no-validate"]) == 0
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["fp32.onnx"]


def test_float_export_past_the_large_weights_size_goes_to_external_data(tiny_dirs, tmp_path, monkeypatch):
    """Float weights past LARGE_WEIGHTS_BYTES (64 MiB; lowered here below the tiny model's size) go to
    OUT.onnx.data by default (onnxruntime decodes large fp32 graphs faster from the mapped file);
    --no-external-data still writes one file."""
    import mcsmoe_deploy.exporters.torch_export as torch_export
    from mcsmoe_deploy.cli import main_export

    assert torch_export.LARGE_WEIGHTS_BYTES == 64 << 20
    monkeypatch.setattr(torch_export, "LARGE_WEIGHTS_BYTES", 100_000)
    for folder, flags, files in (("default", [], ["fp32.onnx", "fp32.onnx.data"]),
                                 ("one", ["--no-external-data"], ["fp32.onnx"])):
        out = tmp_path / folder / "fp32.onnx"
        out.parent.mkdir()
        assert main_export([str(tiny_dirs["mixtral"]), str(out), "--no-validate", "--quiet", *flags]) == 0
        assert sorted(p.name for p in out.parent.iterdir()) == files


def test_merged_int4_blocks_are_qmoe_low_rank_and_int8_stay_matmul_nbits(tiny_dirs, tmp_path):
    """Under target ort, merged int4 groups (G < E) become QMoE too (at accuracy level 4 it decodes them
    faster than the op's body as MatMulNBits); low-rank int4 blocks and int8 experts (QMoE has no float32
    int8 kernel) keep MatMulNBits. All are written with external data by default, their quantized kernels
    at the export's accuracy level."""
    import mcsmoe_deploy as m

    calib = dict(quantize="int4", quant_block=16, max_calib_tokens=512, calib_seq_len=32)
    for name, recipe in (("g4", dict(experts=4)), ("g4r", dict(experts=4, rank_ratio=0.5))):
        m.compress_model(tiny_dirs["mixtral"], tmp_path / name, m.CompressionRecipe(**recipe, **calib), progress=False)
    cases = (("merged", tmp_path / "g4", {}, "QMoE"), ("merged-acc0", tmp_path / "g4", dict(accuracy_level=0), "QMoE"),
             ("merged-experts0", tmp_path / "g4", dict(expert_accuracy_level=0), "QMoE"),
             ("low-rank", tmp_path / "g4r", {}, "MatMulNBits"),
             ("low-rank-experts0", tmp_path / "g4r", dict(expert_accuracy_level=0), "MatMulNBits"),
             ("int8", tiny_dirs["mixtral"], dict(quantize="int8", quant_block=16), "MatMulNBits"))
    for name, source, options, experts_as in cases:
        out = tmp_path / name / "model.onnx"
        out.parent.mkdir()
        report = m.export_model(source, out, **options)
        assert all(check.max_rel_error < 1e-4 for check in report.parity)
        counts = _op_counts(out)
        assert counts["GroupedLowRankMoE"] == 0 and counts["MatMulNBits"] > 0, counts
        assert counts["QMoE"] == (LAYERS if experts_as == "QMoE" else 0), counts
        # (is an expert's kernel, level): the experts' at expert_accuracy_level, attention's and the head's not
        levels = {(node.op_type == "QMoE" or ".experts." in node.input[1], a.i)
                  for node in onnx.load(str(out), load_external_data=False).graph.node
                  if node.op_type in ("QMoE", "MatMulNBits") for a in node.attribute if a.name == "accuracy_level"}
        level = options.get("accuracy_level", 4)
        expert_level = options.get("expert_accuracy_level", level)
        assert levels == {(True, expert_level), (False, level)}, (name, levels)
        # the export's summary says it too
        assert report.accuracy_levels.get("QMoE") == ({expert_level: LAYERS} if experts_as == "QMoE" else None)
        assert level in report.accuracy_levels["MatMulNBits"], report.accuracy_levels
        if experts_as == "QMoE":
            assert f"QMoE x{LAYERS} at {expert_level}" in format_export(report)
        assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_one_file_refused_in_one_line_when_the_weights_do_not_fit(tiny_dirs, tmp_path, capsys, monkeypatch):
    """--no-external-data past protobuf's limit (lowered here to the tiny model's size): one error line,
    nothing written; without the flag the same export goes to external data."""
    import mcsmoe_deploy.exporters.torch_export as torch_export
    from mcsmoe_deploy.cli import main

    monkeypatch.setattr(torch_export, "EXTERNAL_DATA_THRESHOLD", 1000)
    monkeypatch.setattr(torch_export, "LARGE_WEIGHTS_BYTES", 1000)  # below it, as in a real export
    out = tmp_path / "fp32.onnx"
    assert main(["export", str(tiny_dirs["mixtral"]), str(out), "--no-external-data", "--no-validate",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mcsmoe: error:") and "drop --no-external-data" in err[0], err
    assert list(tmp_path.iterdir()) == []
    assert main(["export", str(tiny_dirs["mixtral"]), str(out), "--no-validate"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "fp32.onnx.data"]


def test_sessions_allocate_initializers_outside_the_arena():
    """open_session's options (session_options) give the graph's weights their own allocations."""
    from mcsmoe_deploy.runtime.ort_session import INITIALIZERS_OUTSIDE_ARENA_KEY, session_options

    options = session_options(threads=2)
    assert options.get_session_config_entry(INITIALIZERS_OUTSIDE_ARENA_KEY) == "1"
    assert options.intra_op_num_threads == 2
