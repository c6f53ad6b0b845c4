"""Preconditions that passes declare in `requires()`: raise `ir.passes.PreconditionError` when unmet."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import onnx_ir as ir

from ...contract import DOMAIN, OP_TYPE


def moe_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The `ai.mcsmoe::GroupedLowRankMoE` nodes of the main graph, in graph order."""
    return [node for node in graph if (node.domain, node.op_type) == (DOMAIN, OP_TYPE)]


_Plan = TypeVar("_Plan")


def planned_moe_nodes(graph: ir.Graph, plan_node: Callable[[ir.Node], _Plan],
                      qualifies: Callable[[_Plan], bool] | None = None) -> list[tuple[ir.Node, _Plan]]:
    """(node, plan_node(node)) for the MoE nodes a pass rewrites. qualifies None: every node, and
    plan_node's ValueError (naming the node) propagates, before anything changes; else only the nodes
    that plan_node accepts and `qualifies`, the others left as they are."""
    if qualifies is None:
        return [(node, plan_node(node)) for node in moe_nodes(graph)]
    planned = []
    for node in moe_nodes(graph):
        try:
            plan = plan_node(node)
        except ValueError:  # not this pass's kind of block: stays the op
            continue
        if qualifies(plan):
            planned.append((node, plan))
    return planned


def require_moe_weights(model: ir.Model, who: str, selective: bool) -> None:
    """Precondition of a pass mapping every MoE node: each node's grouping and weight initializers can
    be read (`require_weight_values`). A selective pass (one that leaves a node it cannot read as it
    is, see `planned_moe_nodes`) requires nothing."""
    if selective:
        return
    inputs = [v for node in moe_nodes(model.graph) for v in node.inputs[2:] if v is not None and v.is_initializer()]
    require_weight_values(inputs, who)


def overload_fields(node: ir.Node) -> tuple[int | None, dict[str, str]]:
    """(G, {projection: kind}) read from a MoE node's overload (`MoEOpSpec.overload`, e.g.
    `gated_silu_k2_norm_g8_gate-dense_up-dense_down-dense_pergroup`): G is None when no `gN` token
    names it; only the kinds contain "-"."""
    tokens = node.overload.split("_")
    groups = [int(token[1:]) for token in tokens if token[:1] == "g" and token[1:].isdigit()]
    kinds = dict(token.split("-", 1) for token in tokens if "-" in token)
    return (groups[0] if len(groups) == 1 else None), kinds


def mapping_refused(node: ir.Node, target_op: str, reason: str, scope: str) -> ValueError:
    """The error of a pass that cannot map MoE node `node` to `target_op` ("com.microsoft::MoE"):
    why (`reason`), then what its target is for (`scope`)."""
    return ValueError(f"cannot map {DOMAIN}::{OP_TYPE} node {node.name!r} to {target_op}: {reason}; {scope}")


def onnxruntime_only_ops(graph: ir.Graph) -> dict[str, int]:
    """{"domain::op_type": count} of the nodes only onnxruntime runs: the com.microsoft contrib ops and
    SimplifiedLayerNormalization (onnxruntime's, in the default domain) that export target "ort" writes."""
    found: dict[str, int] = {}
    for node in graph:
        if node.domain == "com.microsoft" or (node.domain == "" and node.op_type == "SimplifiedLayerNormalization"):
            key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            found[key] = found.get(key, 0) + 1
    return found


def require_weight_values(values: Iterable[ir.Value], who: str) -> None:
    """Precondition: each initializer's bytes can be read (in memory, or an external file that exists).

    An export's passes run on a graph whose weights stay on disk (read lazily through
    `ir.ExternalTensor`); this fails early when the file they refer to is not there, e.g. a
    proto loaded without external data and no base folder set.
    """
    for value in values:
        tensor = value.const_value
        if tensor is None:
            raise ir.passes.PreconditionError(f"{who} reads the values of {value.name!r}, which has none")
        if isinstance(tensor, ir.ExternalTensor) and not os.path.isfile(tensor.path):
            raise ir.passes.PreconditionError(
                f"{who} reads the values of {value.name!r}, external data in {tensor.path!r}, which does not exist"
            )


__all__ = ["mapping_refused", "moe_nodes", "onnxruntime_only_ops", "overload_fields", "planned_moe_nodes",
           "require_moe_weights", "require_weight_values"]
