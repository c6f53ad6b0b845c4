"""Function bodies of `ai.mcsmoe::GroupedLowRankMoE` measured against the shipped one (moe_body.gather_tokens).

- "dense_all": every group's expert on every token, MatMuls batched over G, then a weighted sum
  over G. Shape-generic in G, but G/k times the needed work.
- "loop_tokens": gather_tokens as an ONNX Loop over groups: shape-generic in G, but the weight
  slices are copied per call.
- "gather_weights": the picked groups' factors are gathered per (token, pick) and applied with
  one batched MatMul; copies k weight sets per token.

Each is tested against the torch reference like the shipped body; benchmarks/op_decomposition.py
times them on onnxruntime CPU (docs/ops.md).
"""

from __future__ import annotations

from onnx import TensorProto, helper

from .moe_body import Body, _apply_projection, _expert, _group_weights, _routing, group_expert
from .op_spec import MoEOpSpec

# ---------------------------------------------------------------------------------------------
# dense_all


def _project_all_groups(b: Body, spec: MoEOpSpec, name: str, h: str) -> str:
    """Projection `name` of every group: h [T, in] or [G, T, in] -> [G, T, out]."""
    proj = dict(spec.projections)[name]
    inputs = spec.projection_inputs(name)
    perm = [0, 2, 1]
    if proj.dense:
        return b("MatMul", h, b("Transpose", inputs[0], perm=perm))
    left, right = inputs[:2]
    y = b("MatMul", b("MatMul", h, b("Transpose", right, perm=perm)), b("Transpose", left, perm=perm))
    if proj.sparse_rows:
        rows, values = inputs[2:]
        extra = b("MatMul", h, b("Transpose", values, perm=perm))  # [G, T, n]
        index = b("Expand", b("Unsqueeze", rows, b.ints([1])), b("Shape", extra))  # [G, T, n]
        # reduction add: repeated row indices accumulate, like torch index_add
        y = b.scatter_add("ScatterElements", y, index, extra, axis=2)
    return y


def _dense_all(b: Body, spec: MoEOpSpec) -> str:
    weights = b("CastLike", b("Unsqueeze", _group_weights(b, spec), b.ints([2])), "hidden")  # [G, T, 1]
    expert_out = _expert(b, spec, "hidden", lambda name, h: _project_all_groups(b, spec, name, h))  # [G, T, H]
    return b("ReduceSum", b("Mul", expert_out, weights), b.ints([0]), keepdims=0)


# ---------------------------------------------------------------------------------------------
# loop_tokens


def _loop_tokens(b: Body, spec: MoEOpSpec) -> str:
    """gather_tokens as an ONNX Loop over groups: shape-generic in G, but the per-group weight
    slices take a loop-variable index, so they are copied at run time instead of folded."""
    by_group = _group_weights(b, spec)  # [G, T]
    step = Body(prefix="loop")
    column = step("Gather", by_group, "group", axis=0)  # [T]
    tokens = step("Reshape", step("NonZero", step("Greater", column, step.float_like(0.0, column))), step.ints([-1]))
    # a group without tokens skips its weight copies
    run = Body(prefix="run")
    y = group_expert(run, spec, "group", run("Gather", "hidden", tokens, axis=0))
    scale = run("CastLike", run("Unsqueeze", run("Gather", column, tokens, axis=0), run.ints([1])), "hidden")
    added = run.scatter_add("ScatterND", "acc_in", run("Unsqueeze", tokens, run.ints([1])), run("Mul", y, scale))
    run.output(added, "run_out")
    skip = Body(prefix="skip")
    skip.output("acc_in", "skip_out")
    branches = {
        "then_branch": helper.make_graph(run.nodes, "run", [], [helper.make_empty_tensor_value_info("run_out")]),
        "else_branch": helper.make_graph(skip.nodes, "skip", [], [helper.make_empty_tensor_value_info("skip_out")]),
    }
    has_tokens = step("Greater", step("Size", tokens), step.scalar_int(0))
    step.output(step("If", has_tokens, **branches), "acc_out")
    step.output("cond_in", "cond_out")
    scalar = lambda name, dtype: helper.make_tensor_value_info(name, dtype, [])  # noqa: E731
    graph = helper.make_graph(
        step.nodes,
        "group_step",
        [scalar("group", TensorProto.INT64), scalar("cond_in", TensorProto.BOOL),
         helper.make_empty_tensor_value_info("acc_in")],
        [scalar("cond_out", TensorProto.BOOL), helper.make_empty_tensor_value_info("acc_out")],
    )
    trips = b("Squeeze", b("Shape", by_group, start=0, end=1), b.ints([0]))
    zeros = b("CastLike", b("ConstantOfShape", b("Shape", "hidden")), "hidden")
    return b("Loop", trips, "", zeros, body=graph)


# ---------------------------------------------------------------------------------------------
# gather_weights


def _project_picked(b: Body, spec: MoEOpSpec, name: str, picked: str, h: str) -> str:
    """Projection `name` of each pick's group: h [P, 1, in], picked [P] -> [P, 1, out]."""
    proj = dict(spec.projections)[name]
    inputs = spec.projection_inputs(name)

    def weight_t(tensor: str) -> str:  # [P, in, out]; the transpose of an initializer folds away
        return b("Gather", b("Transpose", tensor, perm=[0, 2, 1]), picked, axis=0)

    def add_rows(y: str, rows: str, extra: str) -> str:  # extra [P, 1, n]
        row_index = b("Unsqueeze", b("Gather", rows, picked, axis=0), b.ints([1]))  # [P, 1, n]
        return b.scatter_add("ScatterElements", y, row_index, extra, axis=2)

    return _apply_projection(b, proj, inputs, h, weight_t, add_rows)


def _gather_weights(b: Body, spec: MoEOpSpec) -> str:
    top_w, top_i = _routing(b, spec)
    group = b("Reshape", b("Gather", "expert_to_group", top_i, axis=0), b.ints([-1]))  # [P = T k]
    kept = b("CastLike", b("GreaterOrEqual", group, b.scalar_int(0)), top_w)
    # a removed expert's pick runs group 0 with weight 0 (cheaper than a dynamic filter)
    picked = b("Max", group, b.scalar_int(0))
    weight = b("Mul", b("Reshape", top_w, b.ints([-1])), kept)  # [P]
    # sizes come from the inputs (blocks differing only in sizes share a body); 0 in Reshape keeps H
    repeat = b("Concat", b("Shape", top_i), b.ints([1]), axis=0)  # [T, k, 1]
    x = b("Reshape", b("Expand", b("Unsqueeze", "hidden", b.ints([1])), repeat), b.ints([-1, 1, 0]))  # [P, 1, H]
    y = _expert(b, spec, x, lambda name, h: _project_picked(b, spec, name, picked, h))  # [P, 1, H]
    y = b("Mul", y, b("CastLike", b("Reshape", weight, b.ints([-1, 1, 1])), "hidden"))
    k_rows = b("Reshape", y, b.ints([-1, spec.top_k, 0]))  # [T, k, H]
    return b("ReduceSum", k_rows, b.ints([1]), keepdims=0)


BUILDERS = {"dense_all": _dense_all, "loop_tokens": _loop_tokens, "gather_weights": _gather_weights}
