"""Function bodies of `ai.mcsmoe::GroupedLowRankMoE`: the op's semantics in standard ONNX ops.

All bodies share the routing prelude (softmax, top-k, optional renormalisation,
group weights [T, G]) and differ in how the G merged experts meet the tokens:

- "gather_tokens" (shipped): per group, unrolled over G, the tokens routed to it
  are gathered, run through that group's expert alone and scatter-added back.
  Work is what routing asks for (a group with no tokens runs 0-row MatMuls), and
  the per-group weight slices are constant, so runtimes fold them once (into a copy
  of each: op version 3, written under target ort, takes float factors per group,
  [in, out], and slices nothing; quantized factors are per group since version 2).
- "dense_all": every group's expert on every token, MatMuls batched over G, then a
  weighted sum over G. Shape-generic in G, but G/k times the needed work.
- "loop_tokens": gather_tokens as an ONNX Loop over groups: shape-generic in G,
  but the weight slices are copied per call.
- "gather_weights": the picked groups' factors are gathered per (token, pick) and
  applied with one batched MatMul; copies k weight sets per token.

- "gather_groups", "picked_groups" (moe_body_picked): only the groups some token
  picked, batched; picked_groups ships for small float per-group blocks
  (`moe_body_picked.body_strategy`).

dense_all, loop_tokens and gather_weights are built in moe_body_alternatives.

All are tested against the torch reference; benchmarks/op_decomposition.py times
them on onnxruntime CPU (numbers in docs/ops.md).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .op_spec import MoEOpSpec

STRATEGIES = ("dense_all", "gather_tokens", "loop_tokens", "gather_weights", "gather_groups", "picked_groups")
DEFAULT_STRATEGY = "gather_tokens"


class Body:
    """Appends nodes to a function body, naming intermediate values t0, t1, ..."""

    def __init__(self, prefix: str = "t") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix  # subgraphs need names distinct from their outer graph's
        self._count = 0
        self._constants: dict[tuple, str] = {}  # one node per distinct constant

    def __call__(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [f"{self.prefix}{self._count + i}" for i in range(outputs)]
        self._count += outputs
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def _constant(self, key: tuple, make) -> str:
        if key not in self._constants:
            self._constants[key] = make()
        return self._constants[key]

    def ints(self, values: list[int]) -> str:
        array = np.array(values, dtype=np.int64)
        return self._constant(("ints", tuple(values)), lambda: self("Constant", value=numpy_helper.from_array(array)))

    def scalar_int(self, value: int) -> str:
        array = np.array(value, dtype=np.int64)
        return self._constant(("int", value), lambda: self("Constant", value=numpy_helper.from_array(array)))

    def float_like(self, value: float, like: str) -> str:
        # constants follow the data's dtype (float, float16, bfloat16)
        make = lambda: self("CastLike", self("Constant", value_float=value), like)  # noqa: E731
        return self._constant(("float", value, like), make)

    def scatter_add(self, op_type: str, data: str, index: str, updates: str, **attrs) -> str:
        """ScatterElements / ScatterND with reduction "add", computed in float32: onnxruntime's
        CPU kernels refuse float16 reductions; for float32 data the casts are no-ops."""
        as_float = lambda v: self("Cast", v, to=TensorProto.FLOAT)  # noqa: E731
        return self("CastLike", self(op_type, as_float(data), index, as_float(updates), reduction="add", **attrs), data)

    def output(self, value: str, name: str = "output") -> None:
        """Rename the final value to the body's formal output."""
        self.nodes.append(helper.make_node("Identity", [value], [name]))


def activation(b: Body, kind: str, a: str) -> str:
    """act(a), elementwise, matching transformers' ACT2FN."""
    if kind == "relu":
        return b("Relu", a)
    if kind == "silu":
        return b("Mul", a, b("Sigmoid", a))
    half_a = b("Mul", a, b.float_like(0.5, a))
    if kind == "gelu":  # exact: 0.5 a (1 + erf(a / sqrt 2))
        inner = b("Erf", b("Mul", a, b.float_like(float(1 / np.sqrt(2)), a)))
    else:  # gelu_tanh: 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))
        cube = b("Mul", b("Mul", a, a), a)
        poly = b("Add", a, b("Mul", cube, b.float_like(0.044715, a)))
        inner = b("Tanh", b("Mul", poly, b.float_like(float(np.sqrt(2 / np.pi)), a)))
    return b("Mul", half_a, b("Add", inner, b.float_like(1.0, a)))


def _expert(b: Body, spec: MoEOpSpec, x: str, project) -> str:
    """One expert's feed-forward network, `project(name, h)` applying projection `name`."""
    if spec.gated:
        inner = b("Mul", activation(b, spec.activation, project("gate", x)), project("up", x))
        return project("down", inner)
    return project("wo", activation(b, spec.activation, project("wi", x)))


def _routing(b: Body, spec: MoEOpSpec) -> tuple[str, str]:
    """Top-k picks: weights [T, k] (router dtype) and expert indices [T, k]."""
    if spec.normalize_topk:
        # softmax over E, the k largest, divided by their sum == softmax over the k largest logits
        # (softmax keeps the order): two nodes instead of four
        top_logits, top_i = b("TopK", "router_logits", b.ints([spec.top_k]), axis=-1, largest=1, sorted=1, outputs=2)
        return b("Softmax", top_logits, axis=-1), top_i
    probs = b("Softmax", "router_logits", axis=-1)
    top_w, top_i = b("TopK", probs, b.ints([spec.top_k]), axis=-1, largest=1, sorted=1, outputs=2)
    return top_w, top_i


def _group_weights(b: Body, spec: MoEOpSpec) -> str:
    """a [G, T]: summed routing weight of each token's picks per group (router dtype)."""
    top_w, top_i = _routing(b, spec)
    if spec.quantized or spec.split_floats or spec.shared_basis:  # per-group or unstacked inputs: G is fixed by the overload
        num_groups = b.scalar_int(spec.num_groups)
    else:
        first_weight = spec.projection_inputs(spec.projections[0][0])[0]
        num_groups = b("Squeeze", b("Shape", first_weight, start=0, end=1), b.ints([0]))
    groups = b("Range", b.scalar_int(0), num_groups, b.scalar_int(1))
    # membership [G, E]: 1 where expert_to_group[e] == g; a removed expert (-1) matches nothing. It depends
    # on initializers only, so runtimes fold it: per call, a Gather of its columns, a Mul and a ReduceSum
    member = b("CastLike", b("Equal", b("Unsqueeze", groups, b.ints([1])),
                             b("Unsqueeze", "expert_to_group", b.ints([0]))), top_w)
    picked = b("Gather", member, top_i, axis=1)  # [G, T, k]: 1 where pick k of token t is in group g
    return b("ReduceSum", b("Mul", picked, top_w), b.ints([-1]), keepdims=0)  # picks landing in one group add up


# ---------------------------------------------------------------------------------------------
# gather_tokens


def project_group(b: Body, spec: MoEOpSpec, name: str, group: int | str, h: str) -> str:
    """Projection `name` of one group alone: h [n, in] -> [n, out].

    `group`: the group number, or the name of a scalar int64 value holding it. With a
    number, the per-group slices (Gather, Transpose) of initializers are constant,
    and runtimes fold them: they cost nothing per call.
    """
    proj = dict(spec.projections)[name]
    inputs = spec.projection_inputs(name)
    index = b.scalar_int(group) if isinstance(group, int) else group
    if proj.quant is not None:
        return _project_group_quantized(b, spec, name, group, h)
    if proj.shared is not None:
        return _project_group_shared(b, spec, name, group, h)
    if spec.per_group:
        return _project_group_split(b, spec, name, group, h)

    def weight_t(tensor: str) -> str:  # [out, in] of this group, transposed to [in, out]
        return b("Transpose", b("Gather", tensor, index, axis=0), perm=[1, 0])

    def add_rows(y: str, rows: str, extra: str) -> str:  # extra [tokens, sparse rows]
        row_index = b("Expand", b("Unsqueeze", b("Gather", rows, index, axis=0), b.ints([0])), b("Shape", extra))
        return b.scatter_add("ScatterElements", y, row_index, extra, axis=1)

    return _apply_projection(b, proj, inputs, h, weight_t, add_rows)


def _project_group_quantized(b: Body, spec: MoEOpSpec, name: str, group: int | str, h: str) -> str:
    """`project_group` for a quantized projection: each factor of group `group` is its own input,
    already [in, out], dequantized blockwise along axis 0 (onnxruntime fuses DQ + MatMul into
    MatMulNBits); Gather cannot slice int4 tensors, hence per-group inputs and a fixed group."""
    if not isinstance(group, int):
        raise ValueError("quantized projections take per-group inputs: the group must be a number")
    proj = dict(spec.projections)[name]
    parts = 3 if not proj.quant.symmetric else 2
    names = spec.projection_inputs(name)
    per_factor = {factor: names[i * spec.num_groups * parts:(i + 1) * spec.num_groups * parts]
                  for i, factor in enumerate(proj.factors)}
    factor_inputs = {factor: list(per_factor[factor][group * parts:(group + 1) * parts]) for factor in proj.factors}
    by_q = {inputs[0]: inputs for inputs in factor_inputs.values()}
    index = b.scalar_int(group)

    def weight_t(q_name: str) -> str:  # DQ(q [in, out], scale [in / block, out]) -> float [in, out]
        return b("DequantizeLinear", *by_q[q_name], axis=0, block_size=proj.quant.block)

    def add_rows(y: str, rows: str, extra: str) -> str:  # sparse rows stay float and stacked
        row_index = b("Expand", b("Unsqueeze", b("Gather", rows, index, axis=0), b.ints([0])), b("Shape", extra))
        return b.scatter_add("ScatterElements", y, row_index, extra, axis=1)

    def sparse_t(tensor: str) -> str:
        return b("Transpose", b("Gather", tensor, index, axis=0), perm=[1, 0])

    qs = tuple(factor_inputs[factor][0] for factor in proj.factors)
    y = b("MatMul", h, weight_t(qs[0])) if proj.dense else b("MatMul", b("MatMul", h, weight_t(qs[1])), weight_t(qs[0]))
    if proj.sparse_rows:
        rows, values = names[-2:]
        y = add_rows(y, rows, b("MatMul", h, sparse_t(values)))
    return y


def _project_group_split(b: Body, spec: MoEOpSpec, name: str, group: int | str, h: str) -> str:
    """`project_group` for float factors given per group (version 3): `{name}_{factor}_{g}` is already
    [in, out], MatMul's B as is: no Gather or Transpose of a weight for a runtime to fold into a copy."""
    if not isinstance(group, int):
        raise ValueError("per-group inputs need a fixed group number")
    proj = dict(spec.projections)[name]
    names = spec.projection_inputs(name)
    per_factor = {factor: names[i * spec.num_groups + group] for i, factor in enumerate(proj.factors)}
    index = b.scalar_int(group)

    def add_rows(y: str, rows: str, extra: str) -> str:  # sparse rows stay stacked, as in version 1
        row_index = b("Expand", b("Unsqueeze", b("Gather", rows, index, axis=0), b.ints([0])), b("Shape", extra))
        return b.scatter_add("ScatterElements", y, row_index, extra, axis=1)

    def weight_t(tensor: str) -> str:
        if tensor in per_factor.values():
            return tensor
        return b("Transpose", b("Gather", tensor, index, axis=0), perm=[1, 0])  # sparse values [n, in] -> [in, n]

    inputs = tuple(per_factor[factor] for factor in proj.factors) + names[len(proj.factors) * spec.num_groups:]
    return _apply_projection(b, proj, inputs, h, weight_t, add_rows)


def _project_group_shared(b: Body, spec: MoEOpSpec, name: str, group: int | str, h: str) -> str:
    """`project_group` for a shared-basis projection: the shared factor is one input without the group
    axis (transposed once, folded for an initializer); the other factor and sparse rows are sliced
    per group as for a stacked low-rank projection."""
    proj = dict(spec.projections)[name]
    inputs = spec.projection_inputs(name)
    index = b.scalar_int(group) if isinstance(group, int) else group
    # a base-delta projection (version 4): left, right, base [out, in] unstacked, then the sparse rows
    shared = {"left": inputs[0], "right": inputs[1], "base": inputs[2] if proj.has_base else None}[proj.shared]

    def weight_t(tensor: str) -> str:
        sliced = tensor if tensor == shared else b("Gather", tensor, index, axis=0)
        return b("Transpose", sliced, perm=[1, 0])

    def add_rows(y: str, rows: str, extra: str) -> str:
        row_index = b("Expand", b("Unsqueeze", b("Gather", rows, index, axis=0), b.ints([0])), b("Shape", extra))
        return b.scatter_add("ScatterElements", y, row_index, extra, axis=1)

    if not proj.has_base:
        return _apply_projection(b, proj, inputs, h, weight_t, add_rows)
    delta = _apply_projection(b, proj, inputs[:2] + inputs[3:], h, weight_t, add_rows)
    return b("Add", b("MatMul", h, weight_t(shared)), delta)


def _apply_projection(b: Body, proj, inputs: tuple[str, ...], h: str, weight_t, add_rows) -> str:
    """h @ W^T for a dense or low-rank (+ sparse rows) projection.

    `weight_t(tensor)` slices a stacked input and transposes it to [.., in, out];
    `add_rows(y, sparse_rows, extra)` adds the sparse rows' outputs `extra` into y.
    """
    if proj.dense:
        return b("MatMul", h, weight_t(inputs[0]))
    left, right = inputs[:2]
    y = b("MatMul", b("MatMul", h, weight_t(right)), weight_t(left))
    if proj.sparse_rows:
        rows, values = inputs[2:]
        y = add_rows(y, rows, b("MatMul", h, weight_t(values)))
    return y


def group_expert(b: Body, spec: MoEOpSpec, group: int | str, x: str) -> str:
    """One group's merged expert on x [n, H] -> [n, H] (`group` as in `project_group`)."""
    return _expert(b, spec, x, lambda name, h: project_group(b, spec, name, group, h))


def _gather_tokens(b: Body, spec: MoEOpSpec) -> str:
    return _run_routed_tokens(b, spec, _group_weights(b, spec))


def _run_routed_tokens(b: Body, spec: MoEOpSpec, by_group: str) -> str:
    """gather_tokens after the routing prelude: by_group [G, T] -> output [T, H]."""
    routed = b("Greater", by_group, b.float_like(0.0, by_group))  # a zero weight contributes nothing: skip it
    # (group, token) pairs in row-major order, i.e. sorted by group: N pairs, N <= T k
    pairs = b("Transpose", b("NonZero", routed), perm=[1, 0])  # [N, 2]
    tokens = b("Slice", pairs, b.ints([1]), b.ints([2]), b.ints([1]))  # [N, 1]: GatherND / ScatterND indices
    pair_weight = b("Unsqueeze", b("GatherND", by_group, pairs), b.ints([1]))  # [N, 1]
    per_group = b("ReduceSum", b("Cast", routed, to=TensorProto.INT64), b.ints([1]), keepdims=0)  # [G]
    chunks = b("Split", b("GatherND", "hidden", tokens), per_group, axis=0, outputs=spec.num_groups)
    chunks = [chunks] if spec.num_groups == 1 else chunks
    outs = [group_expert(b, spec, g, chunk) for g, chunk in enumerate(chunks)]
    expert_out = outs[0] if len(outs) == 1 else b("Concat", *outs, axis=0)  # [N, H]
    scaled = b("Mul", expert_out, b("CastLike", pair_weight, "hidden"))
    zeros = b("CastLike", b("ConstantOfShape", b("Shape", "hidden")), "hidden")
    # a token picked by several groups receives several rows: reduction add sums them
    return b.scatter_add("ScatterND", zeros, tokens, scaled)


def build_body(spec: MoEOpSpec, strategy: str = DEFAULT_STRATEGY) -> list[onnx.NodeProto]:
    """Nodes computing "output" [T, H] from the formal inputs `spec.input_names()`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} unknown; one of {STRATEGIES}")
    if spec.quantized and strategy != "gather_tokens":
        raise ValueError(f"quantized inputs are built by gather_tokens only, not {strategy!r}")
    if spec.per_group and strategy not in ("gather_tokens", "gather_groups", "picked_groups"):
        raise ValueError(f"per-group inputs are built by gather_tokens, gather_groups or picked_groups, not {strategy!r}")
    if spec.shared_basis and strategy not in ("gather_tokens", "loop_tokens"):
        raise ValueError(f"shared-basis projections are built by gather_tokens or loop_tokens, not {strategy!r}")
    b = Body()
    if strategy == "gather_tokens":
        b.output(_gather_tokens(b, spec))
    else:  # built on this module's parts
        from . import moe_body_alternatives, moe_body_picked

        builders = moe_body_picked.BUILDERS | moe_body_alternatives.BUILDERS
        b.output(builders[strategy](b, spec))
    return b.nodes
