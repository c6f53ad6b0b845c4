"""Feed onnxruntime's MoE / QMoE kernels the [batch, seq, hidden] activations, skipping two Reshapes per block.

The traced graph flattens a block's input to [batch*seq, hidden] (our op and the router take 2-D
rows) and reshapes the block's output back to [batch, seq, hidden]. onnxruntime's `MoE` and `QMoE`
take a 3-D `input` with 2-D `router_probs` [batch*seq, E] and return the input's shape, as
onnxruntime-genai's builder feeds them. So where a kernel node's input is `Reshape(x)` and every
use of its output is a Reshape back to x's shape (the same symbolic dims), the node reads x and
its output replaces those Reshapes: one Reshape per block less on the decode path (the router
still reads the flattened rows), and the output Reshape with its shape computation gone.
Exact: the kernels compute row by row.
"""

from __future__ import annotations

import onnx_ir as ir

from ..ort_ops import ORT_DOMAIN

_KERNELS = ("MoE", "QMoE")


def _known(shape: ir.Shape | None) -> bool:
    """Whether every dim of `shape` is an int or a named symbol (so equal shapes mean equal tensors' shapes)."""
    return shape is not None and all(
        isinstance(dim, int) or (isinstance(dim, ir.SymbolicDim) and dim.value is not None) for dim in shape
    )


def _unflattened_input(node: ir.Node) -> ir.Value | None:
    """x when node's input is Reshape(x) with x [.., .., hidden] and every use of node's output is a
    Reshape to x's shape; else None."""
    flat = node.inputs[0]
    producer = flat.producer() if flat is not None else None
    if producer is None or (producer.domain, producer.op_type) != ("", "Reshape"):
        return None
    source = producer.inputs[0]
    if source is None or not _known(source.shape) or len(source.shape) != 3 or not _known(flat.shape):
        return None
    if source.shape[-1] != flat.shape[-1]:
        return None
    uses = list(node.outputs[0].uses())
    if not uses or node.outputs[0].is_graph_output():
        return None
    for user, _ in uses:
        if (user.domain, user.op_type) != ("", "Reshape") or user.inputs[0] is not node.outputs[0]:
            return None
        reshaped = user.outputs[0]
        if reshaped.is_graph_output() or not _known(reshaped.shape) or reshaped.shape != source.shape:
            return None
    return source


class SkipMoEReshapesPass(ir.passes.InPlacePass):
    """Rewire com.microsoft MoE / QMoE nodes to read and return [batch, seq, hidden] (module docstring);
    the Reshapes left unused go with RemoveUnusedNodesPass (run here)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        graph = model.graph
        modified = False
        for node in list(graph):
            if (node.domain, node.op_type) not in ((ORT_DOMAIN, op) for op in _KERNELS):
                continue
            source = _unflattened_input(node)
            if source is None:
                continue
            output = node.outputs[0]
            for user, _ in list(output.uses()):
                ir.convenience.replace_all_uses_with(user.outputs[0], output)
            node.replace_input_with(0, source)
            output.shape = ir.Shape(list(source.shape))
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


__all__ = ["SkipMoEReshapesPass"]
