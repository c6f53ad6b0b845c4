"""New constant tensors for graph passes: one way to add an initializer, and the int4 packing of codes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def unique_name(base: str, graph: ir.Graph) -> str:
    """`base`, or `base_N` with the smallest N that no initializer, input or node output of `graph` uses."""
    taken = set(graph.initializers) | {v.name for v in graph.inputs} | {
        out.name for node in graph for out in node.outputs}
    name, count = base, 1
    while name in taken:
        name, count = f"{base}_{count}", count + 1
    return name


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, unique: bool = False) -> ir.Value:
    """Register `array` as an initializer of `graph` named `name` (unique: made unique first, which walks
    the graph: for passes that cannot derive a unique name themselves); returns its value."""
    tensor = ir.Tensor(np.ascontiguousarray(array), name=unique_name(name, graph) if unique else name)
    value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def pack_unsigned(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [..., n] -> uint8 [..., ceil(n * bits / 8)]: int8 as is, int4 two per byte, low nibble
    first, an odd row padded with 0 (MatMulNBits', QMoE's and GatherBlockQuantized's layout)."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


__all__ = ["add_initializer", "pack_unsigned", "unique_name"]
