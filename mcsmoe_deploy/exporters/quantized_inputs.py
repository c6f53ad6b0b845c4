"""Quantized expert factors as the op's version-2 inputs: one transposed INT4/UINT4/INT8/UINT8 initializer per group.

The graph is traced with the checkpoint's stacked stored tensors (`<factor>_codes [G, rows,
cols * bits / 8]` uint8, `<factor>_scales [G, rows, cols / block]`, `<factor>_zero_points`),
which keeps tracing deterministic and the torch op the reference. `split_quantized_inputs`
then rewrites each such node in place: per group g and factor, codes become `q [cols, rows]`
(symmetric: signed INT4/INT8 `code - 2^(bits-1)`, no zero point; asymmetric: UINT4/UINT8 with
zero points [cols / block, rows]) and scales `[cols / block, rows]`, so that
`DequantizeLinear(q, scale[, zp], axis=0, block_size=block)` is B [in, out] of a MatMul:
the pattern onnxruntime fuses into `com.microsoft.MatMulNBits`. Why per group: onnxruntime
rejects `Gather` on int4 tensors, and separate initializers also avoid folded slice copies.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..grouped_experts import ProjectionSpec
from ..quantization import QuantSpec
from .initializers import add_initializer
from .op_spec import MoEOpSpec

# DequantizeLinear with block_size and int4 types needs the default-domain opset 21
QUANTIZED_MIN_OPSET = 21


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed codes [..., n * bits / 8] uint8 -> codes [..., n] (int4: low nibble first)."""
    if bits == 8:
        return packed.astype(np.uint8)
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _codes_type(bits: int, symmetric: bool):
    """numpy (ml_dtypes) type of the graph's codes: signed without zero point when symmetric."""
    return {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4,
            (8, True): np.int8, (8, False): np.uint8}[bits, symmetric]


def transposed_quantized_initializers(
    graph: ir.Graph, names: list[str], quant: QuantSpec, packed: np.ndarray, scales: np.ndarray,
    zero_points: np.ndarray | None,
) -> list[ir.Value]:
    """One stored weight [rows, cols] -> initializers [q, scale[, zero point]] of the B [cols, rows] of a MatMul.

    packed [rows, cols * bits / 8] uint8, scales and zero points [rows, cols / block]; `names`
    name the new initializers. q [cols, rows] is signed INT4/INT8 `code - 2^(bits-1)` when
    symmetric, else UINT4/UINT8 with zero points [cols / block, rows]; scales [cols / block, rows].
    Then `DequantizeLinear(q, scale[, zp], axis=0, block_size=quant.block)` is the weight, transposed.
    """
    q = _unpack(packed, quant.bits).T.astype(np.int16)  # [cols, rows]
    if quant.symmetric:
        q = q - quant.symmetric_zero_point
    values = [add_initializer(graph, names[0], q.astype(_codes_type(quant.bits, quant.symmetric))),
              add_initializer(graph, names[1], scales.T)]
    if zero_points is not None:
        values.append(add_initializer(graph, names[2], zero_points.T.astype(_codes_type(quant.bits, False))))
    return values


def _per_group_factor(graph: ir.Graph, proj: ProjectionSpec, stored: list[ir.Value]) -> list[list[ir.Value]]:
    """One factor's stacked codes, scales[, zero points] -> per group [q, scale[, zero point]] initializers."""
    codes, scales = stored[0].const_value.numpy(), stored[1].const_value.numpy()  # [G, rows, ...]
    zero_points = stored[2].const_value.numpy() if len(stored) > 2 else None
    return [
        transposed_quantized_initializers(
            graph, [f"{stored[0].name}.q{g}", f"{stored[1].name}.t{g}", f"{stored[-1].name}.t{g}"], proj.quant,
            codes[g], scales[g], None if zero_points is None else zero_points[g],
        )
        for g in range(codes.shape[0])
    ]


def split_quantized_inputs(graph: ir.Graph, node: ir.Node, spec: MoEOpSpec) -> None:
    """Rewrite `node`'s traced stacked quantized inputs (and, when `spec.per_group`, float factors: one
    [in, out] initializer `<stacked name>.g<g>` per group) into `spec.input_names()` order (in place).

    Stacked initializers no longer used are removed from `graph`. ValueError when a quantized
    input is not an initializer (the split reads its values).
    """
    traced = list(node.inputs)
    new_inputs, offset = traced[:3], 3
    for name, proj in spec.projections:
        count = len(spec.traced_projection_inputs(name))
        values = traced[offset:offset + count]
        offset += count
        if proj.quant is None and not spec.per_group:
            new_inputs += values
            continue
        if proj.quant is None:  # version 3: float factors per group, [in, out]
            for stored in values[:len(proj.factors)]:
                if stored is None or stored.const_value is None:
                    raise ValueError(f"node {node.name}: float factor of {name} is not an initializer")
                stacked = stored.const_value.numpy()  # [G, rows, cols]
                new_inputs += [add_initializer(graph, f"{stored.name}.g{g}", stacked[g].T) for g in range(len(stacked))]
            new_inputs += values[len(proj.factors):]  # sparse rows and values stay stacked
            continue
        per_factor = len(proj.factor_tensor_names(proj.factors[0]))
        for i, _ in enumerate(proj.factors):
            stored = values[i * per_factor:(i + 1) * per_factor]
            if any(v is None or v.const_value is None for v in stored):
                raise ValueError(f"node {node.name}: quantized factor of {name} is not an initializer")
            new_inputs += [v for group in _per_group_factor(graph, proj, stored) for v in group]
        new_inputs += values[len(proj.factors) * per_factor:]  # sparse rows and values, stacked, float
    if offset != len(traced):
        raise ValueError(f"node {node.name}: {len(traced)} inputs, spec traces {offset}")
    node.resize_inputs(len(new_inputs))
    for i, value in enumerate(new_inputs):
        node.replace_input_with(i, value)
    for value in set(traced) - set(new_inputs):
        if value is not None and value.is_initializer() and not value.uses():
            del graph.initializers[value.name]


__all__ = ["QUANTIZED_MIN_OPSET", "split_quantized_inputs", "transposed_quantized_initializers"]
