"""Target ort: MatMulNBits nodes that read the same activation become one, its output split.

A gated expert multiplies the same tokens by its gate and its up projection; a low-rank one by
both left factors. As two `com.microsoft.MatMulNBits` nodes that is two kernel dispatches (and,
at accuracy level 4, two quantizations of the same activation row) per expert per step; decoding
a token is dominated by such per-node costs. Concatenated along N (the weights' rows: B, scales
and zero points are all laid out [N, ...]) they are one node whose output `Split` cuts back:
every output column is computed as before, from the same codes, so the result is unchanged bit
for bit.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from ..initializers import add_initializer
from ..ort_ops import ORT_DOMAIN
from .matmul_nbits import MATMUL_NBITS

_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


def _key(node: ir.Node) -> tuple | None:
    """What siblings must share to be fused: the activation, K, bits, block, accuracy level, zero points or
    not; None for a node this pass leaves alone (bias or g_idx inputs, weights not its own initializers)."""
    if node.op_type != MATMUL_NBITS or node.domain != ORT_DOMAIN or not 3 <= len(node.inputs) <= 4:
        return None
    if node.outputs[0].is_graph_output():
        return None
    weights = node.inputs[1:]
    if any(v is None or v.const_value is None or len(v.uses()) != 1 or v.is_graph_output() for v in weights):
        return None
    attributes = tuple(node.attributes.get_int(name, -1) for name in _ATTRIBUTES)
    return (id(node.inputs[0]), *attributes, len(weights), weights[1].dtype)


class FuseSiblingMatMulNBitsPass(ir.passes.InPlacePass):
    """Fuse MatMulNBits nodes of one activation into one node and a Split (module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        siblings: dict[tuple, list[ir.Node]] = defaultdict(list)
        for node in graph:
            key = _key(node)
            if key is not None:
                siblings[key].append(node)
        fused = 0
        for nodes in siblings.values():
            if len(nodes) > 1:
                self._fuse(graph, nodes)
                fused += 1
        return ir.passes.PassResult(model, modified=bool(fused))

    @staticmethod
    def _fuse(graph: ir.Graph, nodes: list[ir.Node]) -> None:
        first = nodes[0]
        rows = [node.attributes.get_int("N") for node in nodes]
        weights = []
        for index in range(1, len(first.inputs)):
            array = np.concatenate([node.inputs[index].const_value.numpy() for node in nodes], axis=0)
            name = "+".join(node.inputs[index].name for node in nodes)  # what it holds, in order
            weights.append(add_initializer(graph, name, array))
        attributes = {name: first.attributes.get_int(name) for name in _ATTRIBUTES} | {"N": sum(rows)}
        matmul = ir.node(MATMUL_NBITS, [first.inputs[0], *weights], domain=ORT_DOMAIN, attributes=attributes,
                         name=f"{first.name}.siblings")
        sizes = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(rows, np.int64))},
                        name=f"{first.name}.siblings.sizes")
        split = ir.node("Split", [matmul.outputs[0], sizes.outputs[0]], attributes={"axis": -1},
                        num_outputs=len(nodes), name=f"{first.name}.siblings.split")
        graph.insert_before(first, [sizes, matmul, split])
        for node, output in zip(nodes, split.outputs):
            node.outputs[0].replace_all_uses_with(output)
        old = [value for node in nodes for value in node.inputs[1:]]
        for node in nodes:
            graph.remove(node, safe=True)
        for value in old:
            del graph.initializers[value.name]


__all__ = ["FuseSiblingMatMulNBitsPass"]
