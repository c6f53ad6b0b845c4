"""Target ort: blocked DequantizeLinear + MatMul written as `com.microsoft.MatMulNBits` at export.

onnxruntime fuses the standard pattern itself at load (extended optimisations), but it writes the
packed weights beside the int4 initializers it read, and holds int4 initializers twice even without
fusing: a session held ~3.4x the graph's bytes on disk (benchmarks/session_memory.py). Written here,
the graph holds only MatMulNBits' own uint8 layout, as onnxruntime-genai's builder does (1.1x).

`MatMulNBitsPass` first inlines quantized GroupedLowRankMoE nodes (their expert weights are
DequantizeLinear + MatMul inside the function body, which must stay standard ONNX for other
runtimes; target ort graphs are for onnxruntime only, which has no kernel for the op and inlines
it at load anyway), then rewrites every `MatMul(x, DequantizeLinear(q, scale[, zero point],
axis=0, block_size=B))` whose q is an INT4/UINT4/INT8/UINT8 initializer [K, N]:

- B: uint8 [N, K / B, B * bits / 8], the codes of row n, block b, packed low nibble first
  (int4), unsigned (symmetric codes + 2^(bits-1), MatMulNBits' default zero point);
- scales [N, K / B]; asymmetric zero points uint8 [N, ceil(K / B * bits / 8)], packed the same;
- a quantized embedding lookup whose table is a tied head's weight reads the head's B, scales and zero
  points (the same layouts: quantized_embedding_export), so the table is stored once;
- attribute `accuracy_level` (onnxruntime's fusion picks 4 by default, int8 activations;
  `OrtDecoderSession(matmul_accuracy_level=0)` rewrites it to 0 in memory for parity checks), or
  `expert_accuracy_level` on the weights of GroupedLowRankMoE nodes (the experts).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...contract import DOMAIN, OP_TYPE
from ..initializers import add_initializer, pack_unsigned
from ..ort_ops import ORT_DOMAIN
from .inline import inline_passes

MATMUL_NBITS = "MatMulNBits"
DEFAULT_ACCURACY_LEVEL = 4  # what onnxruntime's own DQ + MatMul fusion writes by default
_BITS = {ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False), ir.DataType.INT8: (8, True),
         ir.DataType.UINT8: (8, False)}


def matmul_nbits_initializers(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, bits: int,
                              signed: bool, block: int) -> list[np.ndarray]:
    """DequantizeLinear's (q [K, N], scale [K / block, N][, zero point]) -> MatMulNBits' B, scales[, zero points]."""
    k, n = q.shape
    codes = q.T.astype(np.int16) + ((1 << (bits - 1)) if signed else 0)  # [N, K], unsigned
    packed = pack_unsigned(codes, bits).reshape(n, k // block, block * bits // 8)
    arrays = [np.ascontiguousarray(packed), np.ascontiguousarray(scale.T)]
    if zero_point is not None:
        arrays.append(np.ascontiguousarray(pack_unsigned(zero_point.T.astype(np.int16), bits)))
    return arrays


def _plan(node: ir.Node) -> tuple[ir.Node, int, bool, int] | None:
    """(its DequantizeLinear, bits, signed, block) when MatMul `node` takes a blocked int DQ of an initializer as B."""
    if node.op_type != "MatMul" or node.domain != "" or node.inputs[1] is None:
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    block = dq.attributes.get_int("block_size", 0)
    q = dq.inputs[0]
    if block < 16 or dq.attributes.get_int("axis", 1) != 0 or q.const_value is None or len(q.shape or ()) != 2:
        return None
    if q.dtype not in _BITS or any(v is not None and v.const_value is None for v in dq.inputs[1:]):
        return None
    return dq, *_BITS[q.dtype], block


def _has_quantized_moe(graph: ir.Graph) -> bool:
    return any(node.domain == DOMAIN and node.op_type == OP_TYPE
               and any(v is not None and v.dtype in _BITS for v in node.inputs[3:]) for node in graph)


class MatMulNBitsPass(ir.passes.InPlacePass):
    """Inline quantized GroupedLowRankMoE nodes, then DQ + MatMul -> com.microsoft.MatMulNBits (module docstring).

    A no-op on a graph without quantized weights. `expert_accuracy_level` (None: `accuracy_level`) goes on
    the MatMulNBits nodes of the experts' weights.
    """

    def __init__(self, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, expert_accuracy_level: int | None = None):
        super().__init__()
        self.accuracy_level = accuracy_level
        self.expert_accuracy_level = accuracy_level if expert_accuracy_level is None else expert_accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # inlining rewires the function's DequantizeLinear nodes to these very initializers
        expert_weights = {value.name for node in model.graph if node.domain == DOMAIN and node.op_type == OP_TYPE
                          for value in node.inputs if value is not None}
        inlined = _has_quantized_moe(model.graph)
        if inlined:
            for inline in inline_passes():
                model = inline(model).model
        graph, packed, replaced = model.graph, {}, set()
        for node in list(graph):
            plan = _plan(node)
            if plan is None:
                continue
            dq, bits, signed, block = plan
            q = dq.inputs[0]
            if q.name not in packed:
                arrays = [v.const_value.numpy() if v is not None else None for v in dq.inputs]
                arrays += [None] * (3 - len(arrays))
                new = matmul_nbits_initializers(arrays[0], arrays[1], arrays[2], bits, signed, block)
                packed[q.name] = [add_initializer(graph, f"{q.name}.nbits{i}", a) for i, a in enumerate(new)]
            k, n = q.shape
            level = self.expert_accuracy_level if q.name in expert_weights else self.accuracy_level
            fused = ir.node(MATMUL_NBITS, [node.inputs[0], *packed[q.name]], domain=ORT_DOMAIN,
                            attributes={"K": int(k), "N": int(n), "bits": bits, "block_size": block,
                                        "accuracy_level": level}, name=f"{node.name}.nbits")
            ir.convenience.replace_nodes_and_values(graph, node, [node], [fused], node.outputs, fused.outputs)
            replaced.add(dq)
        if packed:  # a quantized embedding table tied to the LM head: one copy of its codes
            from ..quantized_embedding_export import share_lookup_initializers

            share_lookup_initializers(graph, [value for values in packed.values() for value in values])
        for dq in replaced:
            if not any(out.uses() or out.is_graph_output() for out in dq.outputs):
                graph.remove(dq, safe=True)
        for value in list(graph.initializers.values()):
            if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                del graph.initializers[value.name]
        if packed:
            model.opset_imports.setdefault(ORT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=inlined or bool(packed))


__all__ = ["DEFAULT_ACCURACY_LEVEL", "MATMUL_NBITS", "MatMulNBitsPass", "matmul_nbits_initializers"]
