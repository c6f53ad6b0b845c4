"""fuse_moe_for_ort: dense SwiGLU GroupedLowRankMoE nodes -> com.microsoft.MoE, same outputs in onnxruntime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from mcsmoe_deploy.exporters import DOMAIN, OP_TYPE, MoEOpSpec, make_moe_node, standalone_model
from mcsmoe_deploy.exporters.ort_fused import ORT_DOMAIN, ORT_MOE, fuse_moe_for_ort, plan_ort_fusion
from mcsmoe_deploy.grouped_experts import ProjectionSpec

E, H, I = 6, 16, 24  # experts, hidden, intermediate
TOKEN_COUNTS = (1, 5, 33)


def _spec(
    top_k: int = 2, normalize: bool = True, num_groups: int = E, gated: bool = True, activation: str = "silu",
    rank: int | None = None, sparse_rows: int = 0,
) -> MoEOpSpec:
    shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)} if gated else {"wi": (I, H), "wo": (H, I)}
    return MoEOpSpec(
        num_experts=E, num_groups=num_groups, hidden_size=H, intermediate_size=I, top_k=top_k, gated=gated,
        activation=activation, routing="softmax_topk_norm" if normalize else "softmax_topk",
        projections=tuple((name, ProjectionSpec(*shape, rank, sparse_rows)) for name, shape in shapes.items()),
    )


def _weights(spec: MoEOpSpec, expert_to_group: list[int], seed: int, prefix: str = "") -> list[onnx.TensorProto]:
    """Seeded initializers for every input after the router logits, named `prefix + input name`."""
    rng = np.random.default_rng(seed)
    tensors = [numpy_helper.from_array(np.array(expert_to_group, dtype=np.int64), prefix + "expert_to_group")]
    for name, shape in spec.input_shapes().items():
        if name in ("hidden", "router_logits", "expert_to_group"):
            continue
        if name.endswith("_sparse_rows"):
            value = rng.integers(0, I, size=shape)
        else:
            value = (rng.standard_normal(shape) * 0.4).astype(np.float32)
        tensors.append(numpy_helper.from_array(value, prefix + name))
    return tensors


def _one_node_model(spec: MoEOpSpec, expert_to_group: list[int] | None = None, seed: int = 0) -> onnx.ModelProto:
    """`standalone_model(spec)` with every weight input (and the grouping) turned into an initializer."""
    model = standalone_model(spec)
    tensors = _weights(spec, list(range(E)) if expert_to_group is None else expert_to_group, seed)
    model.graph.initializer.extend(tensors)
    names = {t.name for t in tensors}
    kept = [v for v in model.graph.input if v.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _inputs(tokens: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # hidden scaled so that some gate pre-activations pass 7, where a GPT-OSS style clamp would show
    hidden = (rng.standard_normal((tokens, H)) * 3).astype(np.float32)
    logits = (rng.standard_normal((tokens, E)) * 2).astype(np.float32)
    return {"hidden": hidden, "router_logits": logits}


def _assert_close(got: np.ndarray, reference: np.ndarray) -> None:
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("normalize", [False, True])
def test_fused_node_matches_function_body(top_k, normalize):
    model = _one_node_model(_spec(top_k, normalize))
    reference = _session(model)
    gate = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "gate_weight"))

    fused = fuse_moe_for_ort(model)

    assert fused is model  # in place
    (node,) = fused.graph.node
    assert (node.domain, node.op_type) == (ORT_DOMAIN, ORT_MOE)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["k"] == top_k and attrs["normalize_routing_weights"] == int(normalize)
    assert (attrs["activation_type"], attrs["swiglu_fusion"]) == (b"swiglu", 1)
    initializers = {t.name: list(t.dims) for t in fused.graph.initializer}
    assert initializers == {"gate_weight.swiglu_fc1": [E, 2 * I, H], "down_weight": [E, H, I]}
    assert not fused.functions
    assert {o.domain for o in fused.opset_import} == {"", ORT_DOMAIN}
    onnx.checker.check_model(fused, full_check=True)

    session = _session(fused)
    for seed, tokens in enumerate(TOKEN_COUNTS):
        feeds = _inputs(tokens, seed)
        if tokens > 1:  # the inputs reach the range where clamping (swiglu_limit 7) would change results
            assert np.abs(np.einsum("gih,th->gti", gate, feeds["hidden"])).max() > 7
        _assert_close(session.run(None, feeds)[0], reference.run(None, feeds)[0])


def test_blocks_sharing_one_function_are_all_fused():
    """Two blocks (one overload, like the layers of a real model) chained: both fused, the function dropped."""
    spec = _spec(top_k=2, normalize=False)
    nodes = [
        make_moe_node(spec, ["hidden", "router_logits"] + [f"b0.{n}" for n in spec.input_names()[2:]], "mid", "b0"),
        make_moe_node(spec, ["mid", "router_logits"] + [f"b1.{n}" for n in spec.input_names()[2:]], "output", "b1"),
    ]
    graph = helper.make_graph(
        nodes, "two_blocks",
        [helper.make_tensor_value_info("hidden", onnx.TensorProto.FLOAT, ["T", H]),
         helper.make_tensor_value_info("router_logits", onnx.TensorProto.FLOAT, ["T", E])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["T", H])],
        _weights(spec, list(range(E)), 1, "b0.") + _weights(spec, list(range(E)), 2, "b1."),
    )
    model = standalone_model(spec)  # for its function, opset imports and IR version
    model.graph.CopyFrom(graph)
    reference = _session(model)
    feeds = _inputs(9, 0)
    expected = reference.run(None, feeds)[0]

    plan = plan_ort_fusion(model)
    assert [(f.node_name, f.gate, f.top_k, f.normalize_topk) for f in plan] == [
        ("b0", "b0.gate_weight", 2, False), ("b1", "b1.gate_weight", 2, False)
    ]
    fuse_moe_for_ort(model)

    assert [(n.domain, n.op_type, n.name) for n in model.graph.node] == [(ORT_DOMAIN, ORT_MOE, "b0"),
                                                                          (ORT_DOMAIN, ORT_MOE, "b1")]
    assert sorted(t.name for t in model.graph.initializer) == [
        "b0.down_weight", "b0.gate_weight.swiglu_fc1", "b1.down_weight", "b1.gate_weight.swiglu_fc1"
    ]
    assert not model.functions and DOMAIN not in {o.domain for o in model.opset_import}
    _assert_close(_session(model).run(None, feeds)[0], expected)


@pytest.mark.parametrize(
    "spec, expert_to_group, message",
    [
        (_spec(rank=4), None, r"compressed \(gate is lowrank, up is lowrank, down is lowrank\)"),
        (_spec(rank=4, sparse_rows=2), None, "gate is lowrank-sparse"),
        (_spec(num_groups=3), [0, 0, 1, 1, 2, 2], r"not the identity arange\(6\) over 3 groups"),
        (_spec(), [0, 1, 2, 3, 4, -1], r"not the identity arange\(6\)"),
        (_spec(activation="gelu"), None, "activation 'gelu' is not silu"),
        (_spec(gated=False, activation="relu"), None, "not gated"),
    ],
    ids=["lowrank", "lowrank-sparse", "merged", "removed", "gelu", "plain"],
)
def test_unfusable_node_is_refused_and_model_unchanged(spec, expert_to_group, message):
    model = _one_node_model(spec, expert_to_group)
    before = model.SerializeToString()
    with pytest.raises(ValueError, match=f"{OP_TYPE} node 'moe' to {ORT_DOMAIN}::{ORT_MOE}: .*{message}") as error:
        fuse_moe_for_ort(model)
    assert "only for dense SwiGLU models" in str(error.value)
    assert model.SerializeToString() == before


def test_weights_that_are_graph_inputs_are_refused():
    model = standalone_model(_spec())  # weights fed at run time: nothing to rewrite into fc1
    with pytest.raises(ValueError, match="input 'expert_to_group' is not an initializer"):
        fuse_moe_for_ort(model)


def test_float16_weights_are_refused():
    model = _one_node_model(_spec())
    for tensor in model.graph.initializer:
        if tensor.name.endswith("_weight"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    with pytest.raises(ValueError, match="'gate_weight' is float16; onnxruntime's CPU MoE kernel runs float32 only"):
        fuse_moe_for_ort(model)


def _per_group_model(spec: MoEOpSpec, expert_to_group: list[int] | None = None, seed: int = 0) -> onnx.ModelProto:
    """`_one_node_model` with the op's version-3 inputs: one [in, out] initializer per group and projection."""
    return _one_node_model(dataclasses.replace(spec, per_group=True), expert_to_group, seed)


@pytest.mark.parametrize("normalize", [False, True])
def test_per_group_weights_fuse_to_the_same_kernel_inputs(normalize):
    """Target ort writes version-3 per-group [in, out] weights: the pass stacks them back into fc1/fc2."""
    model = _per_group_model(_spec(2, normalize))
    reference = _session(model)
    gates = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("gate_weight_")}

    fuse_moe_for_ort(model)

    (node,) = model.graph.node
    assert (node.domain, node.op_type) == (ORT_DOMAIN, ORT_MOE)
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert {name: list(v.shape) for name, v in initializers.items()} == {
        "gate_weight_0.swiglu_fc1": [E, 2 * I, H], "down_weight_0.moe_fc2": [E, H, I]}
    np.testing.assert_array_equal(initializers["gate_weight_0.swiglu_fc1"][3, 0::2], gates["gate_weight_3"].T)
    for seed, tokens in enumerate(TOKEN_COUNTS):
        feeds = _inputs(tokens, seed)
        _assert_close(_session(model).run(None, feeds)[0], reference.run(None, feeds)[0])


def test_dense_float_only_leaves_other_blocks_as_they_are():
    """Target ort's mode: a merged block and a dense one; only the dense one becomes MoE, nothing is refused."""
    from mcsmoe_deploy.exporters.passes import GraphPassManager
    from mcsmoe_deploy.exporters.passes.ort_moe import ort_fusion_passes

    dense, merged = _spec(), _spec(num_groups=3)
    nodes = [make_moe_node(spec, ["hidden" if i == 0 else "mid", "router_logits"]
                           + [f"b{i}.{n}" for n in spec.input_names()[2:]], "mid" if i == 0 else "output", f"b{i}")
             for i, spec in enumerate((dense, merged))]
    graph = helper.make_graph(
        nodes, "two_blocks",
        [helper.make_tensor_value_info("hidden", onnx.TensorProto.FLOAT, ["T", H]),
         helper.make_tensor_value_info("router_logits", onnx.TensorProto.FLOAT, ["T", E])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["T", H])],
        _weights(dense, list(range(E)), 1, "b0.") + _weights(merged, [0, 0, 1, 1, 2, 2], 2, "b1."),
    )
    model = standalone_model(dense)
    model.functions.extend(standalone_model(merged).functions)
    model.graph.CopyFrom(graph)
    reference = _session(model)
    feeds = _inputs(9, 0)

    ir_model = ir.from_proto(model)
    GraphPassManager(ort_fusion_passes(dense_float_only=True))(ir_model)
    fused = ir.to_proto(ir_model)

    assert [(n.domain, n.op_type) for n in fused.graph.node] == [(ORT_DOMAIN, ORT_MOE), (DOMAIN, OP_TYPE)]
    assert [f.name for f in fused.functions] == [OP_TYPE]
    _assert_close(_session(fused).run(None, feeds)[0], reference.run(None, feeds)[0])


@pytest.mark.parametrize("back_to", [["batch", "seq", H], ["seq", "batch", H]], ids=["same-shape", "other-shape"])
def test_moe_reads_unflattened_activations_only_when_the_output_is_reshaped_back(back_to):
    from mcsmoe_deploy.exporters.passes.moe_reshapes import SkipMoEReshapesPass

    model = _one_node_model(_spec())
    fuse_moe_for_ort(model)
    (moe,) = model.graph.node
    moe.input[0], moe.output[0] = "rows", "moe_rows"
    model.graph.node.insert(0, helper.make_node("Reshape", ["x", "flat"], ["rows"]))
    model.graph.node.append(helper.make_node("Reshape", ["moe_rows", "unflat"], ["output"]))
    model.graph.initializer.extend([numpy_helper.from_array(np.array([-1, H], np.int64), "flat"),
                                    numpy_helper.from_array(np.array([2, -1, H], np.int64), "unflat")])
    del model.graph.input[:], model.graph.output[:], model.graph.value_info[:]
    model.graph.input.extend([helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", H]),
                              helper.make_tensor_value_info("router_logits", onnx.TensorProto.FLOAT, ["T", E])])
    model.graph.output.append(helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, back_to))
    model.graph.value_info.extend([helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, ["T", H]),
                                   helper.make_tensor_value_info("moe_rows", onnx.TensorProto.FLOAT, ["T", H])])
    # the block's output is reshaped back into an intermediate value, as in an exported decoder
    model.graph.node[-1].output[0] = "block"
    model.graph.node.append(helper.make_node("Identity", ["block"], ["output"]))
    model.graph.value_info.append(helper.make_tensor_value_info("block", onnx.TensorProto.FLOAT, back_to))
    feeds = _inputs(6, 0)
    feeds = {"x": feeds["hidden"].reshape(2, 3, H), "router_logits": feeds["router_logits"]}
    expected = _session(model).run(None, feeds)[0]

    ir_model = ir.from_proto(model)
    result = SkipMoEReshapesPass()(ir_model)
    rewritten = ir.to_proto(ir_model)

    ops = [n.op_type for n in rewritten.graph.node]
    assert result.modified == (back_to[0] == "batch")
    assert ops == (["MoE", "Identity"] if result.modified else ["Reshape", "MoE", "Reshape", "Identity"])
    _assert_close(_session(rewritten).run(None, feeds)[0], expected)
