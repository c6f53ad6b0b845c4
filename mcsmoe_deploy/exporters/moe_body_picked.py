"""Function bodies of `ai.mcsmoe::GroupedLowRankMoE` that run only the groups some token picked.

gather_tokens (moe_body) runs every group's nodes on every call, on 0 rows for a group no token
picked: at batch-1 decode (T k picks < G groups) most of them idle, and on a small model their
fixed per-node cost is most of the block's time (benchmarks/results/fused-attention.md).

- "gather_groups": every token through each of the A groups some token picked, batched: the A
  groups' factors are gathered from a stacked [G, in, out] (a dense gate and up side by side, one
  MatMul), MatMul broadcasts the tokens over them, and each (group, token) row is weighted by the
  token's group weight (0 where it did not pick the group) and summed over A. Nodes do not grow
  with G; the cost is a copy of A groups' factors per call and A T rows of work for T k picks,
  so it is meant for few tokens.
- "picked_groups": gather_groups while T k < G (fewer picks than groups: some group surely idle),
  else gather_tokens; one `If` per call on the token count.

The stacked factors depend on initializers only, so runtimes fold them once: a copy of the
experts' float factors beside the per-group inputs. Hence picked_groups ships only for float
per-group (target ort) blocks whose groups hold at most `SMALL_GROUP_VALUES` values
(`picks_groups`); larger groups keep gather_tokens (a per-call copy of their factors would cost
more than the idle groups' nodes, and the session would hold their bytes twice).
"""

from __future__ import annotations

from onnx import helper

from .moe_body import DEFAULT_STRATEGY, Body, _apply_projection, _expert, _group_weights, _run_routed_tokens, activation
from .op_spec import MoEOpSpec

# values (all factors and sparse values) of one group: the embedded model's 55k qualify, the 330 MB
# random Mixtral's 1.6M do not (its decode reads weights from memory, where a copy per call costs more)
SMALL_GROUP_VALUES = 1 << 18


def group_values(spec: MoEOpSpec) -> int:
    """Float values one group's factors and sparse values hold."""
    total = 0
    for _, proj in spec.projections:
        total += sum(rows * cols for rows, cols in map(proj.factor_shape, proj.factors))
        total += proj.sparse_rows * proj.in_features
    return total


def picks_groups(spec: MoEOpSpec) -> bool:
    """Whether a node of structure `spec` ships picked_groups (see the module docstring)."""
    float_only = not spec.quantized and not spec.shared_basis
    return spec.split_floats and float_only and spec.num_groups > 1 and group_values(spec) <= SMALL_GROUP_VALUES


def body_strategy(spec: MoEOpSpec) -> str:
    """The strategy a node of structure `spec` ships: picked_groups for small float per-group (target ort)
    blocks, whose decode is bound by per-node costs, else gather_tokens."""
    return "picked_groups" if picks_groups(spec) else DEFAULT_STRATEGY


def _stacked_factors(b: Body, spec: MoEOpSpec) -> dict[str, str]:
    """Every float factor (and sparse values) of every group as [G, in, out], by its stacked input name
    `{projection}_{factor}`; a dense gate and up also side by side as "gate_up" [G, H, 2I] (one MatMul).
    Stacked inputs [G, out, in] are transposed, per-group inputs (version 3, [in, out] each) stacked: all
    depend on initializers only, so runtimes fold them once (a copy)."""
    stacked = {}
    for name, proj in spec.projections:
        for factor in proj.factors:
            stem = f"{name}_{factor}"
            if spec.per_group:
                parts = [b("Unsqueeze", f"{stem}_{g}", b.ints([0])) for g in range(spec.num_groups)]
                stacked[stem] = b("Concat", *parts, axis=0)
            else:
                stacked[stem] = b("Transpose", stem, perm=[0, 2, 1])
        if proj.sparse_rows:
            stacked[f"{name}_sparse_values"] = b("Transpose", f"{name}_sparse_values", perm=[0, 2, 1])
    if _fuses_gate_up(spec):
        stacked["gate_up"] = b("Concat", stacked.pop("gate_weight"), stacked.pop("up_weight"), axis=2)
    return stacked


def _fuses_gate_up(spec: MoEOpSpec) -> bool:
    projections = dict(spec.projections)
    return spec.gated and projections["gate"].dense and projections["up"].dense


def _project_groups(b: Body, spec: MoEOpSpec, name: str, active: str, h: str, stacked: dict[str, str]) -> str:
    """Projection `name` of each active group: h [T, in] or [A, T, in], active [A] -> [A, T, out]."""
    proj = dict(spec.projections)[name]
    inputs = tuple(f"{name}_{factor}" for factor in proj.factors)
    if proj.sparse_rows:
        inputs += (f"{name}_sparse_rows", f"{name}_sparse_values")

    def weight_t(tensor: str) -> str:  # [A, in, out]
        return b("Gather", stacked[tensor], active, axis=0)

    def add_rows(y: str, rows: str, extra: str) -> str:  # extra [A, T, sparse rows]
        row_index = b("Expand", b("Unsqueeze", b("Gather", rows, active, axis=0), b.ints([1])), b("Shape", extra))
        return b.scatter_add("ScatterElements", y, row_index, extra, axis=2)

    return _apply_projection(b, proj, inputs, h, weight_t, add_rows)


def _run_picked_groups(b: Body, spec: MoEOpSpec, by_group: str, stacked: dict[str, str]) -> str:
    """Every token through each of the A groups some token picked, batched (MatMul broadcasts hidden
    [T, H] over the A gathered factors [A, in, out]), weighted by its group weight (0 where it did not
    pick the group) and summed over A. Work A T rows, for T k routed: meant for few tokens."""
    active = b("Reshape", b("NonZero", b("Greater", b("ReduceSum", by_group, b.ints([1]), keepdims=0),
                                         b.float_like(0.0, by_group))), b.ints([-1]))  # [A]
    weight = b("CastLike", b("Unsqueeze", b("Gather", by_group, active, axis=0), b.ints([2])), "hidden")  # [A, T, 1]
    project = lambda name, h: _project_groups(b, spec, name, active, h, stacked)  # noqa: E731
    if _fuses_gate_up(spec):
        gate, up = b("Split", b("MatMul", "hidden", b("Gather", stacked["gate_up"], active, axis=0)), axis=2,
                     num_outputs=2, outputs=2)
        y = project("down", b("Mul", activation(b, spec.activation, gate), up))
    else:
        y = _expert(b, spec, "hidden", project)  # [A, T, H]
    return b("ReduceSum", b("Mul", y, weight), b.ints([0]), keepdims=0)


def _gather_groups(b: Body, spec: MoEOpSpec) -> str:
    return _run_picked_groups(b, spec, _group_weights(b, spec), _stacked_factors(b, spec))


def _picked_groups(b: Body, spec: MoEOpSpec) -> str:
    """gather_groups while the picks (T k) are fewer than the groups, so that some groups surely get no
    token (decode), else gather_tokens: one If per call, chosen on the token count."""
    by_group = _group_weights(b, spec)  # [G, T]
    stacked = _stacked_factors(b, spec)  # outside the If: folded once in the main graph
    few = Body(prefix="few")
    few.output(_run_picked_groups(few, spec, by_group, stacked), "few_out")
    many = Body(prefix="many")
    many.output(_run_routed_tokens(many, spec, by_group), "many_out")
    branches = {
        "then_branch": helper.make_graph(few.nodes, "few", [], [helper.make_empty_tensor_value_info("few_out")]),
        "else_branch": helper.make_graph(many.nodes, "many", [], [helper.make_empty_tensor_value_info("many_out")]),
    }
    # T k < G  <=>  T < ceil(G / k); If takes the one-element [1] as its condition
    few_tokens = b("Less", b("Shape", "hidden", start=0, end=1), b.ints([-(-spec.num_groups // spec.top_k)]))
    return b("If", few_tokens, **branches)


BUILDERS = {"gather_groups": _gather_groups, "picked_groups": _picked_groups}
