"""The pass behind `--target ort-fused`: dense SwiGLU GroupedLowRankMoE nodes -> `com.microsoft.MoE`.

The kernel's facts (routing, fc1 layout, SwiGLU constants, float32 only) are in
exporters/ort_fused.py, which also offers the same rewrite on an `onnx.ModelProto`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ...grouped_experts import ProjectionSpec
from ..moe_op import MoEOpSpec
from ..initializers import unique_name
from ..ort_ops import ORT_DOMAIN
from .requirements import mapping_refused, moe_nodes, require_weight_values

ORT_MOE = "MoE"
_GATED_PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class MoEFusion:
    """One GroupedLowRankMoE node found fusable: its sizes, routing and weight initializers.

    gate, up: initializers [E, I, H]; down: [E, H, I]; expert_to_group: [E] int64.
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


def _refuse(node: ir.Node, reason: str) -> ValueError:
    return mapping_refused(node, f"{ORT_DOMAIN}::{ORT_MOE}", reason,
                           "target 'ort-fused' is only for dense SwiGLU models (export compressed models with target 'ort' or 'portable')")


def _projection_kinds(node: ir.Node) -> dict[str, str]:
    """Projection name -> kind from the node's overload, e.g. {"gate": "lowrank-sparse", "up": "dense"}."""
    # MoEOpSpec.overload: family_activation_kK_norm[_gG]_{name}-{kind}...; only the kinds contain "-"
    return dict(token.split("-", 1) for token in node.overload.split("_") if "-" in token)


def _plan_node(node: ir.Node) -> MoEFusion:
    attrs = node.attributes
    if not attrs.get_int("gated", 0):
        raise _refuse(node, "its experts are not gated (MoE's fused FC1 needs gate and up projections)")
    activation = attrs.get_string("activation", "")
    if activation != "silu":
        raise _refuse(node, f"activation {activation!r} is not silu")
    compressed = {name: kind for name, kind in _projection_kinds(node).items() if kind != "dense"}
    if compressed or len(node.inputs) != 6:
        detail = ", ".join(f"{name} is {kind}" for name, kind in compressed.items()) or f"{len(node.inputs)} inputs"
        raise _refuse(node, f"its projections are compressed ({detail}), not dense")

    e2g, gate, up, down = node.inputs[2:]
    for value in (e2g, gate, up, down):
        if value is None or not value.is_initializer() or value.const_value is None:
            raise _refuse(node, f"input {getattr(value, 'name', '')!r} is not an initializer")
    for value in (gate, up, down):
        weight = value.const_value
        if weight.dtype != ir.DataType.FLOAT:
            dtype = weight.dtype.numpy()
            raise _refuse(node, f"weight {value.name!r} is {dtype}; onnxruntime's CPU MoE kernel runs float32 only")
        if len(weight.shape) != 3:
            raise _refuse(node, f"weight {value.name!r} has shape {list(weight.shape)}, not [G, out, in]")
    num_groups, inter, hidden = gate.const_value.shape.numpy()
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
        )
    except ValueError as error:
        raise _refuse(node, str(error)) from None
    shapes = {v.name: list(v.const_value.shape.numpy()) for v in (gate, up, down)}
    if list(shapes.values()) != [spec.input_shapes()[f"{p}_weight"] for p in _GATED_PROJECTIONS]:
        raise _refuse(node, f"weight shapes {shapes} do not fit gate/up [E, I, H], down [E, H, I]")
    return MoEFusion(
        node_name=node.name or "", num_experts=num_experts, hidden_size=hidden, intermediate_size=inter,
        top_k=spec.top_k, normalize_topk=spec.normalize_topk, gate=gate.name, up=up.name, down=down.name,
        expert_to_group=e2g.name,
    )


def plan_fusion(model: ir.Model) -> list[MoEFusion]:
    """Check every GroupedLowRankMoE node of the main graph and describe its fusion; changes nothing.

    Raises ValueError naming the first node that cannot become com.microsoft.MoE
    (compressed, not gated, not silu, merged/removed experts, not float32).
    """
    return [_plan_node(node) for node in moe_nodes(model.graph)]


def _interleaved_fc1(gate: ir.TensorProtocol, up: ir.TensorProtocol) -> np.ndarray:
    """[E, 2I, H] float32 with fc1[:, 2i] = gate[:, i] and fc1[:, 2i + 1] = up[:, i] (swiglu_fusion=1)."""
    num_experts, inter, hidden = gate.shape.numpy()
    fc1 = np.empty((num_experts, inter, 2, hidden), dtype="<f4")
    fc1[:, :, 0] = gate.numpy()  # external weights are read through a memory map, one block at a time
    fc1[:, :, 1] = up.numpy()
    return fc1.reshape(num_experts, 2 * inter, hidden)


class FuseMoEForOrtPass(ir.passes.InPlacePass):
    """Rewrite every GroupedLowRankMoE node into one com.microsoft.MoE node (in place).

    Requires: the gate, up and expert_to_group values of every MoE node can be read (in
    memory or in an external data file that exists). The whole graph is planned first
    (`plan_fusion`), so a ValueError leaves the model unchanged. Per node: fc1 = gate and up
    interleaved ([E, 2I, H], a new float32 initializer; blocks sharing gate and up share
    it), fc2 = `down` [E, H, I] as is, k = top_k, normalize_routing_weights =
    normalize_topk, SwiGLU set to plain silu(gate) * up, the router logits fed to
    `router_probs` (the kernel applies the softmax). `com.microsoft` version 1 is imported.
    The replaced weights, functions and the ai.mcsmoe import are left for the unused-removal
    passes (see `ort_fusion_passes`).

    Memory: fc1 is built one block at a time; the new tensors hold gate + up bytes.
    """

    def requires(self, model: ir.Model) -> None:
        inputs = [v for node in moe_nodes(model.graph) for v in node.inputs[2:5] if v is not None and v.is_initializer()]
        require_weight_values(inputs, type(self).__name__)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = moe_nodes(graph)
        fusions = plan_fusion(model)
        if not fusions:
            return ir.passes.PassResult(model, modified=False)
        fc1_values: dict[tuple[str, str], ir.Value] = {}
        for node, fusion in zip(nodes, fusions):
            hidden, router, _, gate, up, down = node.inputs
            key = (fusion.gate, fusion.up)
            if key not in fc1_values:
                name = unique_name(f"{fusion.gate}.swiglu_fc1", graph)
                tensor = ir.Tensor(_interleaved_fc1(gate.const_value, up.const_value), name=name)
                fc1_values[key] = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                                           const_value=tensor)
                graph.register_initializer(fc1_values[key])
            fused = ir.Node(
                ORT_DOMAIN, ORT_MOE,
                # input, router_probs, fc1_experts_weights, fc1_experts_bias (none), fc2_experts_weights
                [hidden, router, fc1_values[key], None, down],
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
        model.opset_imports.setdefault(ORT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=True)


def ort_fusion_passes() -> list[ir.passes.PassBase]:
    """The fusion and the clean-up after it: replaced weights, the op's functions and its opset import go."""
    from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

    return [FuseMoEForOrtPass(), RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()]


__all__ = ["ORT_DOMAIN", "ORT_MOE", "FuseMoEForOrtPass", "MoEFusion", "ort_fusion_passes", "plan_fusion"]
