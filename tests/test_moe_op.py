"""The GroupedLowRankMoE op's ONNX function, run in onnxruntime, against the torch reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from mcsmoe_deploy.exporters import (
    DOMAIN,
    OP_TYPE,
    MoEOpSpec,
    grouped_moe_function,
    make_moe_node,
    register_op_schema,
    standalone_model,
)
from mcsmoe_deploy.exporters.moe_body import DEFAULT_STRATEGY, STRATEGIES, build_body
from mcsmoe_deploy.grouped_experts import GroupedLowRankExperts, ProjectionSpec
from mcsmoe_deploy.models.base import ExpertLayout

H, I = 16, 24  # hidden, intermediate


def _experts(
    gated: bool, activation: str, expert_to_group: list[int], ranks: dict[str, tuple[int | None, int]], seed: int = 0
) -> GroupedLowRankExperts:
    """A reference module with seeded random parameters; ranks: name -> (rank or None, sparse rows)."""
    layout = ExpertLayout(gated, activation, H, I)
    specs = {
        name: ProjectionSpec(*layout.projection_shape(name), *ranks[name]) for name in layout.projections
    }
    module = GroupedLowRankExperts(layout, expert_to_group, specs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        for proj in module.projections.values():
            if proj.spec.sparse_rows:
                # random rows with a repeat in every group: repeats must accumulate like index_add
                rows = torch.randint(0, proj.spec.out_features, proj.sparse_rows.shape, generator=gen)
                if rows.shape[1] > 1:
                    rows[:, -1] = rows[:, 0]
                proj.sparse_rows.copy_(rows)
    return module


def _route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The families' routing: softmax over E, top-k, optional renormalisation."""
    probs = torch.softmax(logits, dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return index, weights


def _feeds(module: GroupedLowRankExperts, spec: MoEOpSpec, hidden: torch.Tensor, logits: torch.Tensor) -> dict:
    tensors = {"hidden": hidden, "router_logits": logits, "expert_to_group": module.expert_to_group}
    for name, proj in module.projections.items():
        for input_name in spec.projection_inputs(name):
            tensors[input_name] = getattr(proj, input_name[len(name) + 1 :])
    return {k: v.detach().numpy() for k, v in tensors.items()}


def _assert_close(got: np.ndarray, reference: np.ndarray, rtol: float = 1e-5) -> None:
    """max abs diff / max abs reference < rtol (written without division: an all-zero reference must be met exactly)."""
    assert got.shape == reference.shape
    if reference.size:  # no tokens: the shape is all there is to compare
        assert np.abs(got.astype(np.float32) - reference).max() <= rtol * np.abs(reference).max()


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _model(spec: MoEOpSpec, strategy: str = DEFAULT_STRATEGY, elem_type: int = onnx.TensorProto.FLOAT):
    """The one-node model, its function body built with `strategy` (same signature and overload)."""
    model = standalone_model(spec, elem_type=elem_type)
    if strategy != DEFAULT_STRATEGY:
        del model.functions[0].node[:]
        model.functions[0].node.extend(build_body(spec, strategy))
    return model


def _check_against_reference(module, top_k, routing, hidden, logits, strategy: str = DEFAULT_STRATEGY) -> None:
    spec = MoEOpSpec.from_experts(module, top_k, routing)
    model = _model(spec, strategy)
    onnx.checker.check_model(model, full_check=True)
    index, weights = _route(logits, top_k, spec.normalize_topk)
    with torch.no_grad():
        reference = module(hidden, index, weights).numpy()
    _assert_close(_run(model, _feeds(module, spec, hidden, logits)), reference)


def _inputs(tokens: int, experts: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, H, generator=gen), torch.randn(tokens, experts, generator=gen) * 2


GATED_DENSE = {"gate": (None, 0), "up": (None, 0), "down": (None, 0)}
GATED_LOWRANK_SPARSE = {"gate": (4, 3), "up": (5, 2), "down": (3, 4)}
GATED_MIXED = {"gate": (4, 0), "up": (None, 0), "down": (6, 2)}
PLAIN_LOWRANK = {"wi": (4, 0), "wo": (3, 0)}
PLAIN_MIXED = {"wi": (None, 0), "wo": (5, 3)}


@pytest.mark.parametrize("tokens", [1, 17])
@pytest.mark.parametrize(
    "gated, activation, ranks, top_k, routing",
    [
        (True, "silu", GATED_DENSE, 2, "softmax_topk_norm"),  # Mixtral
        (True, "silu", GATED_LOWRANK_SPARSE, 2, "softmax_topk_norm"),
        (True, "silu", GATED_MIXED, 3, "softmax_topk"),  # Qwen2-MoE with norm_topk_prob false
        (False, "relu", PLAIN_LOWRANK, 1, "softmax_topk"),  # Switch
        (False, "gelu", PLAIN_MIXED, 2, "softmax_topk"),
        (False, "gelu_new", PLAIN_MIXED, 2, "softmax_topk_norm"),
    ],
)
def test_function_matches_reference(tokens, gated, activation, ranks, top_k, routing):
    expert_to_group = [0, 1, 2, 3, 0, 1, 2, 3]
    module = _experts(gated, activation, expert_to_group, ranks)
    hidden, logits = _inputs(tokens, len(expert_to_group))
    _check_against_reference(module, top_k, routing, hidden, logits)


@pytest.mark.parametrize("tokens", [1, 17])
def test_picks_in_one_group_add(tokens):
    # experts 0 and 1 share group 0; token 0 is made to pick both
    expert_to_group = [0, 0, 1, 2, 3, 1]
    module = _experts(True, "silu", expert_to_group, GATED_LOWRANK_SPARSE, seed=3)
    hidden, logits = _inputs(tokens, len(expert_to_group), seed=4)
    logits[0, :2] = torch.tensor([5.0, 4.5])
    index, _ = _route(logits, 2, True)
    assert sorted(index[0].tolist()) == [0, 1]
    _check_against_reference(module, 2, "softmax_topk_norm", hidden, logits)
    _check_against_reference(module, 2, "softmax_topk", hidden, logits)


@pytest.mark.parametrize("tokens", [1, 17])
def test_removed_expert_contributes_nothing(tokens):
    expert_to_group = [0, -1, 1, 2, 1, -1]
    module = _experts(False, "relu", expert_to_group, PLAIN_MIXED, seed=5)
    hidden, logits = _inputs(tokens, len(expert_to_group), seed=6)
    logits[0, 1] = 8.0  # token 0's first pick is removed
    for top_k, routing in [(2, "softmax_topk_norm"), (1, "softmax_topk")]:
        _check_against_reference(module, top_k, routing, hidden, logits)
    # top-1 onto a removed expert: the output row is zero
    spec = MoEOpSpec.from_experts(module, 1, "softmax_topk")
    got = _run(standalone_model(spec), _feeds(module, spec, hidden, logits))
    assert np.all(got[0] == 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tokens", [0, 1, 17])
def test_every_body_strategy_matches_reference(strategy, tokens):
    """The bodies the benchmark compares compute the op: picks in one group, removed experts, repeated rows."""
    shared = _experts(True, "silu", [0, 0, 1, 2, 3, 1], GATED_LOWRANK_SPARSE, seed=11)
    hidden, logits = _inputs(tokens, 6, seed=12)
    if tokens:
        logits[0, :2] = torch.tensor([5.0, 4.5])  # token 0 picks experts 0 and 1, both in group 0
    _check_against_reference(shared, 2, "softmax_topk_norm", hidden, logits, strategy)
    removed = _experts(False, "gelu", [0, -1, 1, 2, 1, -1], PLAIN_MIXED, seed=13)
    if tokens:
        logits[0, 1] = 8.0  # token 0's first pick is removed
    _check_against_reference(removed, 2, "softmax_topk", hidden, logits, strategy)


def test_groups_without_tokens():
    """Routing that never reaches some groups (0-row MatMuls), and a group no expert maps to."""
    module = _experts(True, "silu", [0, 0, 3, 3, 1, 1, 3, -1], GATED_LOWRANK_SPARSE, seed=14)  # group 2: no experts
    hidden, logits = _inputs(9, 8, seed=15)
    logits[:, 4:] -= 20.0  # only experts 0..3 are picked: groups 0 and 3 run, 1 and 2 get no tokens
    index, _ = _route(logits, 2, True)
    assert set(module.expert_to_group[index].flatten().tolist()) == {0, 3}
    _check_against_reference(module, 2, "softmax_topk_norm", hidden, logits)


@pytest.mark.parametrize("tokens", [1, 6])
def test_single_group(tokens):
    module = _experts(True, "silu", [0, 0, 0, -1], GATED_MIXED, seed=16)
    hidden, logits = _inputs(tokens, 4, seed=17)
    _check_against_reference(module, 2, "softmax_topk_norm", hidden, logits)


def test_float16_body_runs_in_onnxruntime():
    """float16 data (onnxruntime's CPU scatter kernels have no float16 reduction: the body adds in float32)."""
    module = _experts(True, "silu", [0, 0, 1, 2, 3, 1], GATED_LOWRANK_SPARSE, seed=18)
    spec = MoEOpSpec.from_experts(module, 2, "softmax_topk_norm")
    hidden, logits = _inputs(7, 6, seed=19)
    with torch.no_grad():
        reference = module(hidden, *_route(logits, 2, True)).numpy()
    feeds = _feeds(module, spec, hidden, logits)
    feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    got = _run(_model(spec, elem_type=onnx.TensorProto.FLOAT16), feeds)
    assert got.dtype == np.float16
    _assert_close(got, reference, rtol=1e-2)  # float16 rounding; a wrong body is off by O(1)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        build_body(_spec(GATED_DENSE), "fastest")


def _spec(ranks: dict, gated: bool = True, top_k: int = 2, hidden: int = H, groups: int = 4) -> MoEOpSpec:
    layout = ExpertLayout(gated, "silu", hidden, I)
    projections = tuple((n, ProjectionSpec(*layout.projection_shape(n), *ranks[n])) for n in layout.projections)
    return MoEOpSpec(8, groups, hidden, I, top_k, gated, "silu", "softmax_topk_norm", projections)


def test_overload_names_structure_not_sizes():
    base = _spec(GATED_LOWRANK_SPARSE)
    resized = _spec({"gate": (7, 1), "up": (2, 9), "down": (5, 5)}, hidden=32)
    assert base.overload == resized.overload
    assert grouped_moe_function(base) == grouped_moe_function(resized)
    others = [_spec(GATED_DENSE), _spec(GATED_MIXED), _spec(GATED_LOWRANK_SPARSE, top_k=3)]
    assert len({base.overload} | {s.overload for s in others}) == 4
    # the body is unrolled over groups: G is part of the name
    regrouped = _spec(GATED_LOWRANK_SPARSE, groups=3)
    assert regrouped.overload == base.overload.replace("_g4_", "_g3_") != base.overload
    assert grouped_moe_function(regrouped).node != grouped_moe_function(base).node


def test_two_structures_in_one_model():
    """Two blocks with different bodies: one (domain, name), two overloads, both run in onnxruntime."""
    first = _experts(True, "silu", [0, 1, 2, 3, 0, 1, 2, 3], GATED_DENSE, seed=7)
    second = _experts(True, "silu", [0, 1, 1, 2, -1, 0, 2, 3], GATED_LOWRANK_SPARSE, seed=8)
    specs = [MoEOpSpec.from_experts(m, 2, "softmax_topk_norm") for m in (first, second)]
    hidden, logits = _inputs(5, 8, seed=9)
    feeds, nodes, inputs = {}, [], []
    for i, (module, spec) in enumerate(zip((first, second), specs)):
        block_feeds = _feeds(module, spec, hidden, logits)
        names = [f"b{i}_{n}" for n in spec.input_names()]
        names[0] = "hidden" if i == 0 else "y0"
        names[1] = "router_logits"
        nodes.append(make_moe_node(spec, names, f"y{i}", f"moe{i}"))
        for name, key in zip(names[2:], spec.input_names()[2:]):
            feeds[name] = block_feeds[key]
            dtype = onnx.TensorProto.INT64 if block_feeds[key].dtype == np.int64 else onnx.TensorProto.FLOAT
            inputs.append(helper.make_tensor_value_info(name, dtype, list(block_feeds[key].shape)))
    feeds.update(hidden=hidden.numpy(), router_logits=logits.numpy())
    float_info = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "two_blocks",
        [helper.make_tensor_value_info("hidden", float_info, ["T", H]),
         helper.make_tensor_value_info("router_logits", float_info, ["T", 8])] + inputs,
        [helper.make_tensor_value_info("y1", float_info, ["T", H])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
        functions=[grouped_moe_function(s) for s in specs],
        ir_version=10,
    )
    onnx.checker.check_model(model, full_check=True)
    with torch.no_grad():
        reference = hidden
        for module in (first, second):
            reference = module(reference, *_route(logits, 2, True))
    _assert_close(_run(model, feeds), reference.numpy())


def test_newer_opset_body():
    module = _experts(False, "gelu", [0, 1, 2, 0], PLAIN_MIXED, seed=10)
    spec = MoEOpSpec.from_experts(module, 2, "softmax_topk")
    model = standalone_model(spec, opset=21)
    onnx.checker.check_model(model, full_check=True)
    hidden, logits = _inputs(3, 4)
    with torch.no_grad():
        reference = module(hidden, *_route(logits, 2, False)).numpy()
    _assert_close(_run(model, _feeds(module, spec, hidden, logits)), reference)


def test_register_op_schema_idempotent_and_infers_shape():
    assert register_op_schema() is True
    assert register_op_schema() is True
    assert onnx.defs.has(OP_TYPE, 1, DOMAIN)
    model = standalone_model(_spec(GATED_MIXED))
    del model.functions[:]  # the schema alone must satisfy checker and shape inference
    onnx.checker.check_model(model, full_check=True)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["T", H]


def test_node_attributes_and_validation():
    spec = _spec(GATED_LOWRANK_SPARSE)
    node = make_moe_node(spec, list(spec.input_names()), "y", "moe0")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"top_k": 2, "activation": b"silu", "gated": 1, "normalize_topk": 1}
    assert (node.domain, node.op_type, node.overload) == (DOMAIN, OP_TYPE, spec.overload)
    with pytest.raises(ValueError):
        make_moe_node(spec, ["hidden"], "y", "moe0")
    with pytest.raises(ValueError, match="activation"):
        MoEOpSpec(8, 4, H, I, 2, True, "tanh", "softmax_topk", spec.projections)
    with pytest.raises(ValueError, match="routing"):
        MoEOpSpec(8, 4, H, I, 2, True, "silu", "sigmoid", spec.projections)
    with pytest.raises(ValueError, match="layout order"):
        MoEOpSpec(8, 4, H, I, 2, True, "silu", "softmax_topk", spec.projections[::-1])
    assert MoEOpSpec(8, 4, H, I, 2, True, "swish", "softmax_topk", spec.projections).activation == "silu"


# ---------------------------------------------------------------------------------------------
# one torch reference: the custom op's eager path and the reference module run the same function


@pytest.mark.parametrize(
    "gated, activation, ranks, expert_to_group, top_k, routing",
    [
        (True, "silu", GATED_LOWRANK_SPARSE, [0, 0, 1, 2, 3, 1], 2, "softmax_topk_norm"),
        (False, "gelu", PLAIN_MIXED, [0, -1, 1, 2, 1, -1], 2, "softmax_topk"),
        (False, "relu", PLAIN_LOWRANK, [0, 1, 2, 0, 1, 2], 1, "softmax_topk"),
    ],
)
def test_custom_op_eager_is_the_reference_module(gated, activation, ranks, expert_to_group, top_k, routing):
    """Bit for bit (an activation with two Hugging Face spellings, e.g. gelu_new, would differ in rounding:
    the op names it by its canonical name)."""
    from mcsmoe_deploy.exporters.custom_op import projection_tensors, spec_key
    from mcsmoe_deploy.grouped_experts import route_top_k

    module = _experts(gated, activation, expert_to_group, ranks, seed=21)
    spec = MoEOpSpec.from_experts(module, top_k, routing)
    hidden, logits = _inputs(11, len(expert_to_group), seed=22)
    logits[0, 1] = 8.0  # a removed expert or a shared group among the picks
    with torch.no_grad():
        eager = torch.ops.mcsmoe.grouped_low_rank_moe(
            hidden, logits, module.expert_to_group, projection_tensors(module, spec), spec_key(spec)
        )
        reference = module(hidden, *route_top_k(logits, top_k, spec.normalize_topk))
    assert eager.abs().max() > 0.1
    assert torch.equal(eager, reference)


def test_reference_against_dense_weights_token_by_token():
    """grouped_moe_forward, checked by the plain definition: per token, the sum over its picks of
    weight x (the picked expert's group, with its dense weights), removed experts skipped."""
    expert_to_group = [0, 0, 1, -1, 2, 1]
    module = _experts(True, "silu", expert_to_group, GATED_LOWRANK_SPARSE, seed=23)
    dense = {name: proj.dense_weight() for name, proj in module.projections.items()}
    hidden, logits = _inputs(7, len(expert_to_group), seed=24)
    logits[0, :2] = torch.tensor([5.0, 4.5])  # token 0 picks experts 0 and 1: both group 0
    logits[1, 3] = 9.0  # token 1 picks the removed expert 3
    index, weights = _route(logits, 2, True)
    expected = torch.zeros_like(hidden)
    for token in range(hidden.shape[0]):
        x = hidden[token]
        for expert, weight in zip(index[token].tolist(), weights[token]):
            group = expert_to_group[expert]
            if group < 0:
                continue
            inner = torch.nn.functional.silu(dense["gate"][group] @ x) * (dense["up"][group] @ x)
            expected[token] += weight * (dense["down"][group] @ inner)
    with torch.no_grad():
        got = module(hidden, index, weights)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_split_projection_tensors_follows_node_order():
    module = _experts(True, "silu", [0, 1, 2, 3], GATED_MIXED, seed=25)
    spec = MoEOpSpec.from_experts(module, 2, "softmax_topk")
    flat = [t for name, _ in spec.projections for t in module.projections[name].tensors()]
    split = spec.split_projection_tensors(flat)
    names = [f"{name}_{t}" for name, (proj, _) in split.items() for t in proj.tensor_names]
    assert tuple(names) == spec.input_names()[3:]
    assert split["down"][1][2] is module.projections["down"].sparse_rows
    with pytest.raises(ValueError, match="projection tensors"):
        spec.split_projection_tensors(flat[:-1])


def test_gather_tokens_runs_few_nodes_besides_the_experts(tmp_path):
    # what a decode step pays per block on top of the groups' own nodes (5 per gated dense group after onnxruntime
    # fuses silu): routing and dispatch were 26 run-time nodes, 20 now; the weights are initializers, as exported
    module = _experts(True, "silu", list(range(8)), GATED_DENSE)
    spec = MoEOpSpec.from_experts(module, 2, "softmax_topk_norm")
    model = _model(spec)
    hidden, logits = _inputs(1, 8)
    feeds = _feeds(module, spec, hidden, logits)
    weights = {k: v for k, v in feeds.items() if k not in ("hidden", "router_logits")}
    del model.graph.input[2:]
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in weights.items())
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    index, top = _route(logits, 2, True)
    with torch.no_grad():
        _assert_close(session.run(None, {"hidden": feeds["hidden"], "router_logits": feeds["router_logits"]})[0],
                      module(hidden, index, top).numpy())
    nodes = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    assert len(nodes) <= 20 + 5 * spec.num_groups, sorted(n.op_type for n in nodes)
