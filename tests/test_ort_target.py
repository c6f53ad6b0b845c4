"""Export target 'ort': attention as GroupQueryAttention + RotaryEmbedding, RMSNorms as (Skip)SimplifiedLayerNormalization.

Every decoder family against the torch reference (prefill, decode, a padded batch: right-padded for
the fused graph, left for the portable one) and
against its own portable graph; what onnxruntime's optimizer leaves; per-module fallback; the
residual-Add fold; what refuses the fused graph (TensorRT preparation).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import LAYERS, save_tiny, tiny_model
from padded_batches import padded_batch_errors

import mcsmoe_deploy as m
from mcsmoe_deploy.exporters.passes.skip_norm import SkipNormFusionPass
from mcsmoe_deploy.runtime import GenerationConfig, generate, open_session

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _ops(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module", params=FAMILIES)
def fused(request, tiny_dirs, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"ort_{family}")
    report = m.export_model(tiny_dirs[family], root / "ort.onnx", validate=False)
    m.export_model(tiny_dirs[family], root / "portable.onnx", validate=False, target="portable")
    # a merged checkpoint: its float blocks stay our op under target ort (dense ones become com.microsoft.MoE)
    m.compress_model(tiny_dirs[family], root / "merged", m.CompressionRecipe(experts=2, max_calib_tokens=512,
                                                                             calib_seq_len=32), progress=False)
    m.export_model(root / "merged", root / "merged-ort.onnx", validate=False)
    m.export_model(root / "merged", root / "merged-portable.onnx", validate=False, target="portable")
    return family, report, root


def test_every_attention_and_norm_is_fused(fused):
    family, report, root = fused
    ops = _ops(root / "ort.onnx")
    qk_norms = 2 * LAYERS if family in ("qwen3_moe", "olmoe") else 0
    assert report.target == "ort"
    assert report.fusion == f"{LAYERS}/{LAYERS} attention as GroupQueryAttention, {2 * LAYERS + 1 + qk_norms} " \
                            "RMSNorm as SimplifiedLayerNormalization"
    assert ops["GroupQueryAttention"] == LAYERS and ops["RotaryEmbedding"] == 2 * LAYERS
    # dense SwiGLU blocks: onnxruntime's MoE kernel, fed the [batch, seq, hidden] activations
    assert ops["MoE"] == LAYERS and "GroupedLowRankMoE" not in ops
    graph = ir.load(root / "ort.onnx")
    for node in (n for n in graph.graph if n.op_type == "MoE"):
        # Qwen2-MoE adds its shared expert's rows to the block's before reshaping: that graph keeps 2-D rows
        assert len(node.inputs[0].shape) == (2 if family == "qwen2_moe" else 3) and len(node.inputs[1].shape) == 2
        assert family == "qwen2_moe" or all(user.op_type != "Reshape" for user, _ in node.outputs[0].uses())
    # residual Adds folded: 2 per layer (the last one into the final norm); layer 0's input norm has none
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    assert ops["SimplifiedLayerNormalization"] == 1 + qk_norms
    assert not {"Softmax", "ReduceMean", "Pow", "Sqrt"} & set(ops)
    assert len(onnx.load(str(root / "ort.onnx")).graph.node) < len(onnx.load(str(root / "portable.onnx")).graph.node)
    metadata = {p.key: p.value for p in onnx.load(str(root / "ort.onnx"), load_external_data=False).metadata_props}
    assert metadata["mcsmoe.target"] == "ort"


def test_float_experts_are_per_group_initializers_the_body_does_not_slice(fused):
    """Target ort: op version 3, one [in, out] initializer per group and factor, no Gather/Transpose of a
    weight in the body (onnxruntime would fold each into a copy); portable keeps version 1, stacked."""
    from mcsmoe_deploy.contract import DOMAIN, OP_VERSION, PER_GROUP_OP_VERSION

    family, _, root = fused
    model = onnx.load(str(root / "merged-ort.onnx"))
    assert {i.domain: i.version for i in model.opset_import}[DOMAIN] == PER_GROUP_OP_VERSION
    assert sum(n.op_type == "GroupedLowRankMoE" for n in model.graph.node) == LAYERS
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "GroupedLowRankMoE"):
        assert node.overload.endswith("_pergroup")
        weights = [shapes[name] for name in node.input[3:]]
        groups = len(node.input[3:]) // 3  # gate, up, down, dense: G inputs each
        gate, down = weights[0], weights[2 * groups]
        assert all(len(w) == 2 for w in weights) and gate == down[::-1]  # [H, I] and [I, H]
        assert all(name.endswith(f".g{i % groups}") for i, name in enumerate(node.input[3:]))
    for function in model.functions:
        formals = set(function.input[3:])
        assert not [n for n in function.node if n.op_type in ("Gather", "Transpose") and set(n.input) & formals]
    portable = onnx.load(str(root / "merged-portable.onnx"), load_external_data=False)
    assert {i.domain: i.version for i in portable.opset_import}[DOMAIN] == OP_VERSION
    stacked = {t.name: list(t.dims) for t in portable.graph.initializer}
    for node in (n for n in portable.graph.node if n.op_type == "GroupedLowRankMoE"):
        assert len(node.input) == 6 and all(len(stacked[name]) == 3 for name in node.input[3:])  # [G, out, in]


def test_padded_batches_match_torch_each_padded_as_its_graph_says(fused, tiny_dirs):
    family, _, root = fused
    model, _ = m.load_model(tiny_dirs[family], device="cpu")
    for name, side in (("ort.onnx", "right"), ("portable.onnx", "left")):
        session = open_session(root / name, "ort", threads=1)
        assert session.padding_side == side
        prefill, decode = padded_batch_errors(session, model)
        assert prefill <= 1e-4 and decode <= 1e-4, (name, prefill, decode)


def test_greedy_tokens_equal_the_portable_graphs(fused):
    _, _, root = fused
    prompts = [[5, 17, 99, 3, 250, 41], [7, 8, 9], [100]]
    config = GenerationConfig(max_new_tokens=8)
    tokens = [generate(open_session(root / name, "ort", threads=1), [p], config).tokens
              for p in prompts for name in ("ort.onnx", "portable.onnx")]
    assert tokens[0::2] == tokens[1::2]
    # one padded batch (right-padded for the fused graph, left for the portable one): each row as alone
    batched = [generate(open_session(root / name, "ort", threads=1), prompts, config).tokens
               for name in ("ort.onnx", "portable.onnx")]
    assert batched[0] == batched[1] == [t[0] for t in tokens[0::2]]


def _optimized_ops(path, out) -> Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _ops(out)


def test_onnxruntime_optimizer_keeps_the_fused_ops(fused, tmp_path):
    _, _, root = fused
    ops = _optimized_ops(root / "ort.onnx", tmp_path / "ort.onnx")
    assert ops["GroupQueryAttention"] == LAYERS and ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    assert ops["RotaryEmbedding"] == 2 * LAYERS
    assert ops["MoE"] == LAYERS  # the dense blocks' kernel; the portable graph's op is inlined (no kernel claims it)
    portable = _optimized_ops(root / "portable.onnx", tmp_path / "portable.onnx")
    assert "GroupQueryAttention" not in portable
    assert sum(ops.values()) < sum(portable.values())


def test_sliding_window_becomes_the_local_window_and_matches_torch(tmp_path):
    import json

    save_tiny("mixtral", tmp_path / "src")
    config_path = tmp_path / "src" / "config.json"
    config = json.loads(config_path.read_text())
    config["sliding_window"] = 4  # shorter than the validation's 9-token prompts
    config_path.write_text(json.dumps(config))
    report = m.export_model(tmp_path / "src", tmp_path / "ort.onnx")
    assert report.fusion.startswith(f"{LAYERS}/{LAYERS} attention as GroupQueryAttention")
    windows = [a.i for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node if n.op_type == "GroupQueryAttention"
               for a in n.attribute if a.name == "local_window_size"]
    assert windows == [4] * LAYERS
    assert report.max_rel_error <= 1e-4  # prefill of 9 tokens and a decode step, against transformers' sliding mask
    model, _ = m.load_model(tmp_path / "src", device="cpu")
    ids = np.arange(3, 15)[None]
    tokens = generate(open_session(tmp_path / "ort.onnx", "ort", threads=1), ids, GenerationConfig(max_new_tokens=6))
    with torch.no_grad():
        expected = model.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False)[0, 12:].tolist()
    assert tokens.tokens[0] == expected


def test_inlined_copy_of_the_fused_graph_keeps_onnxruntime_ops(tiny_dirs, tmp_path):
    report = m.export_model(tiny_dirs["mixtral"], tmp_path / "ort.onnx", inline=True)
    flat = onnx.load(str(tmp_path / "ort.inlined.onnx"))
    assert not flat.functions and "ai.mcsmoe" not in {n.domain for n in flat.graph.node}
    assert Counter(n.op_type for n in flat.graph.node)["GroupQueryAttention"] == LAYERS
    assert len(report.parity) == 2 and report.max_rel_error <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_modules_compute_what_transformers_does_in_torch(family):
    # the torch custom ops' eager references, called by the patched modules, against transformers itself
    model = tiny_model(family).eval()
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # a right-padded row, as the fused graph reads batches
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with m.ort_modules_fused(model) as plan:
            got = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert "forward" not in vars(model.model.layers[0].self_attn)  # restored on exit
    assert len(plan.attention) == LAYERS and not plan.kept
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _norm_graph(skip_shape: list) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(["b", "s", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    r = ir.Value(name="r", shape=ir.Shape(skip_shape), type=ir.TensorType(ir.DataType.FLOAT))
    gamma = ir.Value(name="gamma", const_value=ir.tensor(np.linspace(0.5, 1.5, 8, dtype=np.float32)))
    add = ir.node("Add", [x, r])
    add.outputs[0].shape = ir.Shape(["b", "s", 8] if len(skip_shape) == 3 else skip_shape)
    norm = ir.node("SimplifiedLayerNormalization", [add.outputs[0], gamma], {"axis": -1, "epsilon": 1e-5})
    out = ir.node("Add", [add.outputs[0], norm.outputs[0]])  # the next residual reads the sum too
    out.outputs[0].name = "y"
    graph = ir.Graph([x, r], [out.outputs[0]], nodes=[add, norm, out], initializers=[gamma], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def test_skip_norm_pass_folds_a_residual_add_exactly():
    model = _norm_graph(["b", "s", 8])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(2, 3, 8)).astype(np.float32), "r": rng.normal(size=(2, 3, 8)).astype(np.float32)}
    before = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, feeds)[0]
    assert SkipNormFusionPass()(model).modified
    assert [n.op_type for n in model.graph] == ["SkipSimplifiedLayerNormalization", "Add"]
    fused = ir.to_proto(model).graph.node[0]
    assert fused.domain == "com.microsoft" and list(fused.output)[1:3] == ["", ""]
    after = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_skip_norm_pass_leaves_a_broadcasting_add():
    model = _norm_graph([8])
    assert not SkipNormFusionPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Add", "SimplifiedLayerNormalization", "Add"]


def test_tensorrt_preparation_refuses_the_fused_graph(fused, tmp_path):
    from mcsmoe_deploy.runtime.trt_graph import prepare_for_tensorrt

    _, _, root = fused
    with pytest.raises(m.UserError, match=r"holds onnxruntime-only ops \(.*com.microsoft::GroupQueryAttention x2.*\) "
                                          r"of export target 'ort'; TensorRT needs the standard-op graph: export it "
                                          r"with --target portable$"):
        prepare_for_tensorrt(root / "ort.onnx", tmp_path / "trt.onnx")
