"""QuantizedEmbedding lookups in ONNX: gather the stored rows, then dequantize them with standard ops.

Tracing: a QuantizedEmbedding calls the torch custom op `mcsmoe::quantized_embedding` (ids, packed
codes, scales[, zero points]), which `translate_quantized_embedding` maps to a placeholder node
`ai.mcsmoe.trace::QuantizedGather`, finished with the QuantizedMatMul placeholders
(quantized_linear_export.FinishQuantizedMatMulsPass) into

    rows  = Gather(codes [V, H / B, B * bits / 8] uint8, ids)          the packed bytes of each row
    q     = int4: BitwiseAnd(rows, 15) and BitShift(rows, 4, RIGHT), interleaved (low nibble first)
    table = (Cast(q) - zero point[ids]) * scale[ids]                  blockwise, then [..., H]

Only the looked-up rows are dequantized (a DequantizeLinear of the whole table would run on every
step, and ONNX's Gather takes no 4-bit tensors). Target ort writes one
`com.microsoft.GatherBlockQuantized` instead (the same arithmetic, exactly: about 30 us less per
decode step than the ~17 standard nodes on the embedded model). The codes are laid out as MatMulNBits' B and the
scales and packed zero points as its inputs, so under target ort the table of a tied LM head is the
head's MatMulNBits initializers themselves (passes/matmul_nbits reuses them): stored once.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..quantization import QuantSpec
from .initializers import pack_unsigned
from .ort_ops import ORT_DOMAIN
from .trace_placeholders import emit_placeholder, register_placeholder

TRACE_OP = "QuantizedGather"
# names of the initializers a finished lookup reads, so passes/matmul_nbits can find them to share
GATHER_SUFFIXES = (".gather_codes", ".gather_scales", ".gather_zero_points")


def register_gather_schema() -> bool:
    """Register the QuantizedGather placeholder's OpSchema with onnx (idempotent); False when onnx cannot."""
    return register_placeholder(
        TRACE_OP, "Rows of an embedding table stored blockwise quantized (mcsmoe_deploy.quantized_embedding); "
        "replaced by Gather and dequantization before the model is written.", ("ids", "tensor(int64)", "[...]"),
        "vocab", ("rows", "[..., hidden]"), "hidden")


def translate_quantized_embedding(ids, codes, scales, zero_points, bits: int, block: int):
    """torch.onnx translation of `mcsmoe::quantized_embedding`: the placeholder node (module docstring)."""
    return emit_placeholder(TRACE_OP, "ids", ids, codes, scales, zero_points, bits, block)


def gather_initializer_arrays(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                              quant: QuantSpec) -> list[np.ndarray]:
    """The stored (codes [V, H * bits / 8], scales [V, H / B][, zero points [V, H / B]]) as the lookup
    reads them: codes [V, H / B, B * bits / 8], scales as they are, zero points packed [V, ceil(H / B * bits / 8)]
    (MatMulNBits' layouts of B, scales and zero points for the weight [V, H])."""
    vocab, blocks = scales.shape
    arrays = [np.ascontiguousarray(codes.reshape(vocab, blocks, quant.block * quant.bits // 8)), scales]
    if zero_points is not None:
        arrays.append(np.ascontiguousarray(pack_unsigned(zero_points, quant.bits)))
    return arrays


class _Nodes:
    """Collects the nodes of one finished lookup, named after its placeholder."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes = prefix, []

    def add(self, op: str, inputs: list[ir.Value], domain: str = "", **attributes) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes, domain=domain,
                       name=f"{self.prefix}.{op.lower()}{len(self.nodes)}")
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array: np.ndarray) -> ir.Value:
        value = self.add("Constant", [], value=ir.tensor(array, name=f"{self.prefix}.c{len(self.nodes)}"))
        return value

    def unpack_nibbles(self, packed: ir.Value, rank: int) -> ir.Value:
        """uint8 [..., n] -> [..., 2n] codes, the low nibble first (rank: that of `packed`)."""
        low = self.add("BitwiseAnd", [packed, self.const(np.array(15, np.uint8))])
        high = self.add("BitShift", [packed, self.const(np.array(4, np.uint8))], direction="RIGHT")
        axes = self.const(np.array([-1], np.int64))
        pairs = self.add("Concat", [self.add("Unsqueeze", [low, axes]), self.add("Unsqueeze", [high, axes])], axis=-1)
        return self.add("Reshape", [pairs, self.const(np.array([0] * (rank - 1) + [-1], np.int64))])

    def unpacked_zero_points(self, packed: ir.Value, quant: QuantSpec, rank: int, blocks: int) -> ir.Value:
        """Zero points [..., ceil(blocks * bits / 8)] as stored (int4: two per byte) -> one per byte [..., blocks]."""
        if quant.bits == 8:
            return packed
        codes = self.unpack_nibbles(packed, rank)
        return self.add("Slice", [codes, self.const(np.array([0], np.int64)), self.const(np.array([blocks], np.int64)),
                                  self.const(np.array([-1], np.int64))])


def lookup_nodes(node: ir.Node, data: list[ir.Value], quant: QuantSpec, fused: bool = False
                 ) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing placeholder `node`'s rows from the lookup's initializers `data` (codes, scales[, packed
    zero points], gather_initializer_arrays' layouts); returns (nodes, rows [..., H]).

    fused=False: standard ops (module docstring). fused=True (target ort): one
    `com.microsoft.GatherBlockQuantized` on the same codes, its scales and zero points [V, H / B, 1]
    made from the stored ones by nodes of constants only, which onnxruntime folds at load.
    """
    ids = node.inputs[0]
    rank = len(ids.shape) if ids.shape is not None else 2
    blocks = data[1].shape[1]
    nodes = _Nodes(node.name or "quantized_gather")
    last = nodes.const(np.array([-1], np.int64))
    scales, zero = data[1], data[2] if len(data) > 2 else None
    if fused:
        inputs = [data[0], ids, nodes.add("Unsqueeze", [scales, last])]
        if zero is not None:  # the whole table's zero points, one byte each: folded at load
            inputs.append(nodes.add("Unsqueeze", [nodes.unpacked_zero_points(zero, quant, 2, blocks), last]))
        rows = nodes.add("GatherBlockQuantized", inputs, domain=ORT_DOMAIN, gather_axis=0, quantize_axis=2,
                         block_size=quant.block, bits=quant.bits)  # [..., H / B, B]
    else:  # only the rows looked up are unpacked and dequantized
        codes = nodes.add("Gather", [data[0], ids], axis=0)  # [..., H / B, B * bits / 8]
        if quant.bits == 4:
            codes = nodes.unpack_nibbles(codes, rank + 2)
        values = nodes.add("Cast", [codes], to=scales.dtype)
        if zero is not None:
            zero = nodes.unpacked_zero_points(nodes.add("Gather", [zero, ids], axis=0), quant, rank + 1, blocks)
            zero = nodes.add("Unsqueeze", [nodes.add("Cast", [zero], to=scales.dtype), last])
        else:
            zero = nodes.const(np.array(quant.symmetric_zero_point, dtype=scales.dtype.numpy()))
        scale = nodes.add("Unsqueeze", [nodes.add("Gather", [scales, ids], axis=0), last])
        rows = nodes.add("Mul", [nodes.add("Sub", [values, zero]), scale])  # [..., H / B, B]
    rows = nodes.add("Reshape", [rows, nodes.const(np.array([0] * rank + [-1], np.int64))])
    wanted = node.outputs[0].dtype
    if wanted is not None and wanted != scales.dtype:
        rows = nodes.add("Cast", [rows], to=wanted)
    return nodes.nodes, rows


def share_lookup_initializers(graph: ir.Graph, candidates: list[ir.Value]) -> int:
    """Point the lookups of a table at equal initializers among `candidates` (a tied LM head's MatMulNBits
    inputs: the same bytes in the same layout) and drop their own; returns how many were shared."""
    by_key: dict[tuple, list[ir.Value]] = {}
    for value in candidates:
        by_key.setdefault((value.dtype, tuple(value.shape)), []).append(value)
    shared = 0
    for value in [v for v in graph.initializers.values() if v.name.endswith(GATHER_SUFFIXES)]:
        array = value.const_value.numpy()
        twin = next((c for c in by_key.get((value.dtype, tuple(value.shape)), [])
                     if np.array_equal(c.const_value.numpy(), array)), None)
        if twin is not None:
            value.replace_all_uses_with(twin)
            del graph.initializers[value.name]
            shared += 1
    return shared


__all__ = [
    "GATHER_SUFFIXES",
    "gather_initializer_arrays",
    "lookup_nodes",
    "register_gather_schema",
    "share_lookup_initializers",
    "translate_quantized_embedding",
]
