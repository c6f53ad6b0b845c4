"""Residual Add + SimplifiedLayerNormalization -> onnxruntime's `com.microsoft.SkipSimplifiedLayerNormalization`.

The target "ort" traces every RMSNorm as one `SimplifiedLayerNormalization` node (exporters/
ort_ops); a decoder layer's norms read `residual + update`. This pass folds that Add into the
norm: SkipSimplifiedLayerNormalization(input, skip, gamma) gives the normalised output and, as
its 4th output, input + skip, which replaces the Add's output everywhere else (the next
residual). Only an Add of two 3-D inputs of the same shape [B, S, H], not a graph output,
whose result reaches exactly one such norm is folded: the kernel takes no broadcasting.
"""

from __future__ import annotations

import onnx_ir as ir

from ..ort_ops import NORM_OP, ORT_DOMAIN


def _same_3d_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None or len(a.shape) != 3 or len(b.shape) != 3:
        return False
    return all(x == y for x, y in zip(a.shape, b.shape))


class SkipNormFusionPass(ir.passes.InPlacePass):
    """Fold residual Adds into the SimplifiedLayerNormalization they feed (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        outputs = set(graph.outputs)
        count = 0
        for norm in list(graph):
            if norm.domain != "" or norm.op_type != NORM_OP or len(norm.outputs) != 1:
                continue
            add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
            if add is None or add.op_type != "Add" or add.domain != "" or add.outputs[0] in outputs:
                continue
            first, second = add.inputs
            total = add.outputs[0]
            norms_reading = [user for user, _ in total.uses() if user.op_type == NORM_OP and user.domain == ""]
            if not _same_3d_shape(first, second) or len(norms_reading) != 1:
                continue
            epsilon = norm.attributes.get_float("epsilon", 1e-5)
            fused = ir.Node(
                ORT_DOMAIN, "SkipSimplifiedLayerNormalization", [first, second, norm.inputs[1]],
                attributes=[ir.AttrFloat32("epsilon", epsilon)], num_outputs=4,
                name=f"{norm.name}_skip" if norm.name else None,
            )
            y, mean, inv_std, summed = fused.outputs
            mean.name = inv_std.name = ""  # absent outputs: the kernel skips computing them
            y.shape, y.type = norm.outputs[0].shape, norm.outputs[0].type
            summed.shape, summed.type = total.shape, total.type
            graph.insert_before(add, fused)
            norm.outputs[0].replace_all_uses_with(y)
            total.replace_all_uses_with(summed)
            graph.remove([norm, add], safe=True)
            count += 1
        if count:
            model.opset_imports.setdefault(ORT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(count))


__all__ = ["SkipNormFusionPass"]
