"""Dense float32 SwiGLU GroupedLowRankMoE nodes -> `com.microsoft.MoE`: target `ort-fused`, and target
`ort` for the blocks that qualify (`dense_float_only`).

The kernel's facts (routing, fc1 layout, SwiGLU constants, float32 only) are in
exporters/ort_fused.py, which also offers the same rewrite on an `onnx.ModelProto`. Both of the
op's float layouts are read: stacked [G, out, in] weights (op version 1) and per-group [in, out]
ones (version 3, `_pergroup` overloads, what target `ort` writes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ...grouped_experts import ProjectionSpec
from ..moe_op import MoEOpSpec
from ..initializers import unique_name
from ..ort_ops import ORT_DOMAIN
from .requirements import mapping_refused, moe_nodes, overload_fields, planned_moe_nodes, require_moe_weights

ORT_MOE = "MoE"
_GATED_PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class MoEFusion:
    """One GroupedLowRankMoE node found fusable: its sizes, routing and weight initializers.

    gate, up, down: the weight initializers' names: stacked gate, up [E, I, H] and down [E, H, I],
    or (per_group) group 0's of the per-group [in, out] ones; expert_to_group: [E] int64.
    """

    node_name: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    normalize_topk: bool
    gate: str
    up: str
    down: str
    expert_to_group: str
    per_group: bool = False


def _refuse(node: ir.Node, reason: str) -> ValueError:
    return mapping_refused(node, f"{ORT_DOMAIN}::{ORT_MOE}", reason,
                           "target 'ort-fused' is only for dense SwiGLU models (export compressed models with target 'ort' or 'portable')")


def _weight_inputs(node: ir.Node, per_group: bool) -> list[tuple[ir.Value, ...]]:
    """[gate, up, down] inputs: one stacked value each, or (per_group) the G per-group values each."""
    if not per_group:
        if len(node.inputs) != 6:
            raise _refuse(node, f"{len(node.inputs)} inputs, not the 6 of stacked dense gate, up and down")
        return [(value,) for value in node.inputs[3:]]
    groups = overload_fields(node)[0]
    if groups is None:
        raise _refuse(node, f"its overload {node.overload!r} names no group count")
    if len(node.inputs) != 3 + 3 * groups:
        raise _refuse(node, f"{len(node.inputs)} inputs, not the {3 + 3 * groups} of {groups} groups of dense "
                            "gate, up and down")
    return [tuple(node.inputs[3 + p * groups:3 + (p + 1) * groups]) for p in range(3)]


def _plan_node(node: ir.Node) -> MoEFusion:
    attrs = node.attributes
    if not attrs.get_int("gated", 0):
        raise _refuse(node, "its experts are not gated (MoE's fused FC1 needs gate and up projections)")
    activation = attrs.get_string("activation", "")
    if activation != "silu":
        raise _refuse(node, f"activation {activation!r} is not silu")
    compressed = {name: kind for name, kind in overload_fields(node)[1].items() if kind != "dense"}
    per_group = node.overload.endswith("_pergroup")
    if compressed or (not per_group and len(node.inputs) != 6):
        detail = ", ".join(f"{name} is {kind}" for name, kind in compressed.items()) or f"{len(node.inputs)} inputs"
        raise _refuse(node, f"its projections are compressed ({detail}), not dense")

    weights = _weight_inputs(node, per_group)
    e2g = node.inputs[2]
    for value in (e2g, *(v for values in weights for v in values)):
        if value is None or not value.is_initializer() or value.const_value is None:
            raise _refuse(node, f"input {getattr(value, 'name', '')!r} is not an initializer")
    for value in (v for values in weights for v in values):
        weight = value.const_value
        if weight.dtype != ir.DataType.FLOAT:
            dtype = weight.dtype.numpy()
            raise _refuse(node, f"weight {value.name!r} is {dtype}; onnxruntime's CPU MoE kernel runs float32 only")
        if len(weight.shape) != (2 if per_group else 3):
            raise _refuse(node, f"weight {value.name!r} has shape {list(weight.shape)}, not "
                                f"{'[in, out]' if per_group else '[G, out, in]'}")
    gate = weights[0][0].const_value.shape.numpy()
    num_groups, inter, hidden = (len(weights[0]), gate[1], gate[0]) if per_group else gate
    expert_to_group = e2g.const_value.numpy()
    num_experts = expert_to_group.size
    if not np.array_equal(expert_to_group, np.arange(num_experts)) or num_groups != num_experts:
        raise _refuse(node, f"expert_to_group is not the identity arange({num_experts}) over "
                            f"{num_groups} groups (merged or removed experts)")
    # rebuilding the dense spec checks top_k and every shape (the overload names the body, not checked:
    # its format may change with the body strategy)
    try:
        spec = MoEOpSpec(
            num_experts=num_experts, num_groups=num_groups, hidden_size=hidden, intermediate_size=inter,
            top_k=attrs.get_int("top_k", 0), gated=True, activation="silu",
            routing="softmax_topk_norm" if attrs.get_int("normalize_topk", 0) else "softmax_topk",
            projections=(
                ("gate", ProjectionSpec(inter, hidden)),
                ("up", ProjectionSpec(inter, hidden)),
                ("down", ProjectionSpec(hidden, inter)),
            ),
            per_group=per_group,
        )
    except ValueError as error:
        raise _refuse(node, str(error)) from None
    expected = spec.input_shapes()
    names = [name for p in _GATED_PROJECTIONS for name in spec.projection_inputs(p)]
    got = {v.name: list(v.const_value.shape.numpy()) for values in weights for v in values}
    if list(got.values()) != [expected[name] for name in names]:
        raise _refuse(node, f"weight shapes {got} do not fit gate/up [E, I, H], down [E, H, I]")
    return MoEFusion(
        node_name=node.name or "", num_experts=num_experts, hidden_size=hidden, intermediate_size=inter,
        top_k=spec.top_k, normalize_topk=spec.normalize_topk, gate=weights[0][0].name, up=weights[1][0].name,
        down=weights[2][0].name, expert_to_group=e2g.name, per_group=per_group,
    )


def plan_fusion(model: ir.Model) -> list[MoEFusion]:
    """Check every GroupedLowRankMoE node of the main graph and describe its fusion; changes nothing.

    Raises ValueError naming the first node that cannot become com.microsoft.MoE
    (compressed, not gated, not silu, merged/removed experts, not float32).
    """
    return [_plan_node(node) for node in moe_nodes(model.graph)]


def _stacked(values: tuple[ir.Value, ...], per_group: bool) -> np.ndarray:
    """A projection's weights as [E, out, in] float32: the stacked input, or the per-group [in, out] ones
    transposed (read through a memory map when external, one group at a time)."""
    if not per_group:
        return values[0].const_value.numpy()
    return np.stack([value.const_value.numpy().T for value in values])


def _interleaved_fc1(gate: tuple[ir.Value, ...], up: tuple[ir.Value, ...], per_group: bool) -> np.ndarray:
    """[E, 2I, H] float32 with fc1[:, 2i] = gate[:, i] and fc1[:, 2i + 1] = up[:, i] (swiglu_fusion=1)."""
    gate_weights = _stacked(gate, per_group)
    num_experts, inter, hidden = gate_weights.shape
    fc1 = np.empty((num_experts, inter, 2, hidden), dtype="<f4")
    fc1[:, :, 0] = gate_weights
    del gate_weights
    fc1[:, :, 1] = _stacked(up, per_group)
    return fc1.reshape(num_experts, 2 * inter, hidden)


def _lazy_initializer(graph: ir.Graph, name: str, shape: tuple[int, ...], make) -> ir.Value:
    """A float32 initializer whose bytes `make()` computes when the graph is written: the export streams
    weights one tensor at a time, so a model's expert weights are never all in memory."""
    name = unique_name(name, graph)
    tensor = ir.LazyTensor(lambda: ir.Tensor(make()), ir.DataType.FLOAT, ir.Shape(shape), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(ir.DataType.FLOAT), const_value=tensor)
    graph.register_initializer(value)
    return value


class FuseMoEForOrtPass(ir.passes.InPlacePass):
    """Rewrite every GroupedLowRankMoE node into one com.microsoft.MoE node (in place).

    Requires: the weight and expert_to_group values of every MoE node can be read (in
    memory or in an external data file that exists). The whole graph is planned first
    (`plan_fusion`), so a ValueError leaves the model unchanged. Per node: fc1 = gate and up
    interleaved ([E, 2I, H], a new float32 initializer; blocks sharing gate and up share
    it), fc2 = `down` [E, H, I] (as it is when stacked), k = top_k, normalize_routing_weights =
    normalize_topk, SwiGLU set to plain silu(gate) * up, the router logits fed to
    `router_probs` (the kernel applies the softmax). `com.microsoft` version 1 is imported.
    The replaced weights, functions and the ai.mcsmoe import are left for the unused-removal
    passes (see `ort_fusion_passes`).

    Memory: the new tensors (gate + up bytes, and down's when per-group) are computed when the
    graph is written, one at a time (`ir.LazyTensor`).

    dense_float_only: rewrite only the nodes that qualify and leave every other node (compressed,
    merged, quantized, float16) as it is instead of refusing it. Target "ort" does this
    (`ExportConfig.graph_passes`): onnxruntime's kernel runs only the picked experts without
    copying their weights, which the op's standard-ONNX body cannot avoid.
    """

    def __init__(self, dense_float_only: bool = False):
        super().__init__()
        self.dense_float_only = dense_float_only

    def _plan(self, model: ir.Model) -> list[tuple[ir.Node, MoEFusion]]:
        """The nodes to rewrite and their plans; all of them, or (dense_float_only) the qualifying ones."""
        return planned_moe_nodes(model.graph, _plan_node, (lambda _: True) if self.dense_float_only else None)

    def requires(self, model: ir.Model) -> None:
        require_moe_weights(model, type(self).__name__, selective=self.dense_float_only)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        planned = self._plan(model)
        fc1_values: dict[tuple[str, str], ir.Value] = {}
        fc2_values: dict[str, ir.Value] = {}
        for node, fusion in planned:
            gate, up, down = _weight_inputs(node, fusion.per_group)
            key = (fusion.gate, fusion.up)
            if key not in fc1_values:
                fc1_values[key] = _lazy_initializer(
                    graph, f"{fusion.gate}.swiglu_fc1", (fusion.num_experts, 2 * fusion.intermediate_size,
                                                         fusion.hidden_size),
                    lambda gate=gate, up=up, per_group=fusion.per_group: _interleaved_fc1(gate, up, per_group))
            if not fusion.per_group:
                fc2 = down[0]
            elif fusion.down not in fc2_values:
                fc2 = fc2_values[fusion.down] = _lazy_initializer(
                    graph, f"{fusion.down}.moe_fc2", (fusion.num_experts, fusion.hidden_size, fusion.intermediate_size),
                    lambda down=down: _stacked(down, True))
            else:
                fc2 = fc2_values[fusion.down]
            fused = ir.Node(
                ORT_DOMAIN, ORT_MOE,
                # input, router_probs, fc1_experts_weights, fc1_experts_bias (none), fc2_experts_weights
                [node.inputs[0], node.inputs[1], fc1_values[key], None, fc2],
                [
                    ir.AttrInt64("k", fusion.top_k),
                    ir.AttrInt64("normalize_routing_weights", int(fusion.normalize_topk)),
                    ir.AttrString("activation_type", "swiglu"),
                    ir.AttrInt64("swiglu_fusion", 1),  # interleaved gate/up rows
                    ir.AttrFloat32("activation_alpha", 1.0),  # with beta 0 and no swiglu_limit: silu(gate) * up
                    ir.AttrFloat32("activation_beta", 0.0),
                ],
                num_outputs=len(node.outputs),
                name=node.name,
            )
            ir.convenience.replace_nodes_and_values(graph, node, [node], [fused], node.outputs, fused.outputs)
        if planned:
            model.opset_imports.setdefault(ORT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(planned))


def ort_fusion_passes(dense_float_only: bool = False) -> list[ir.passes.PassBase]:
    """The fusion (see FuseMoEForOrtPass for `dense_float_only`) and the clean-up after it: replaced
    weights, the op's functions and its opset import go."""
    from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

    return [FuseMoEForOrtPass(dense_float_only), RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(),
            RemoveUnusedOpsetsPass()]


__all__ = ["ORT_DOMAIN", "ORT_MOE", "FuseMoEForOrtPass", "MoEFusion", "ort_fusion_passes", "plan_fusion"]
