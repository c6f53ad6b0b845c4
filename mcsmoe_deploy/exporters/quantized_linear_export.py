"""QuantizedLinear layers in ONNX: blocked DequantizeLinear + MatMul, which onnxruntime fuses into MatMulNBits.

Tracing: a QuantizedLinear calls the torch custom op `mcsmoe::quantized_matmul` (x, packed codes,
scales[, zero points]), which `translate_quantized_matmul` maps to a bare placeholder node
`ai.mcsmoe.trace::QuantizedMatMul` (an OpSchema is registered so onnxscript emits it). The
placeholder keeps the stored uint8 codes as its input, so no weight is ever traced as float and
torch.onnx's constant folding has nothing to fold. The bias add is traced from torch as is.

Finishing (`FinishQuantizedMatMulsPass`, the first pass of every export): each placeholder
becomes `MatMul(x, DequantizeLinear(q, scale[, zero point], axis=0, block_size))` with the
transposed INT4/UINT4/INT8/UINT8 initializers of quantized_inputs (B [in, out], as onnxruntime's
DQ -> MatMulNBits fusion wants), the packed initializers are dropped, and the default-domain
opset is raised to 21 (blocked DequantizeLinear and int4). The trace domain leaves the file:
only standard ops remain, so `--inline` copies and other runtimes need nothing custom.
"""

from __future__ import annotations

import onnx_ir as ir

from ..quantization import QuantSpec
from .initializers import add_initializer
from .ort_ops import ORT_DOMAIN
from .quantized_embedding_export import GATHER_SUFFIXES, gather_initializer_arrays, lookup_nodes
from .quantized_embedding_export import TRACE_OP as GATHER_OP
from .quantized_inputs import QUANTIZED_MIN_OPSET, transposed_quantized_initializers
from .trace_placeholders import TRACE_DOMAIN, emit_placeholder, register_placeholder

TRACE_OP = "QuantizedMatMul"


def register_trace_schema() -> bool:
    """Register the QuantizedMatMul placeholder's OpSchema with onnx (idempotent); False when onnx cannot."""
    return register_placeholder(
        TRACE_OP, "x @ W.T with W [out, in] stored blockwise quantized (mcsmoe_deploy.quantized_linear); replaced by "
        "DequantizeLinear + MatMul before the model is written.", ("x", "T", "[..., in]"), "out", ("y", "[..., out]"),
        "in")


def translate_quantized_matmul(x, codes, scales, zero_points, bits: int, block: int):
    """torch.onnx translation of `mcsmoe::quantized_matmul`: the placeholder node (see the module docstring)."""
    return emit_placeholder(TRACE_OP, "x", x, codes, scales, zero_points, bits, block)


def _stored(node: ir.Node) -> tuple[QuantSpec, list[ir.Value]]:
    """The placeholder's quantization and its stored [codes, scales[, zero points]] initializers."""
    stored = [value for value in node.inputs[1:] if value is not None]
    if any(value.const_value is None for value in stored):
        raise ValueError(f"node {node.name}: the quantized weight is not an initializer")
    return QuantSpec(node.attributes.get_int("bits"), node.attributes.get_int("block"), len(stored) == 2), stored


def _lookup_initializers(graph: ir.Graph, node: ir.Node, cache: dict[str, list[ir.Value]]) -> list[ir.Value]:
    """The [codes, scales[, zero points]] initializers a QuantizedGather reads (made once per table)."""
    quant, stored = _stored(node)
    key = stored[0].name + GATHER_SUFFIXES[0]
    if key not in cache:
        base = stored[0].name.removesuffix("_codes")
        arrays = gather_initializer_arrays(*[value.const_value.numpy() for value in stored], *[None] * (3 - len(stored)),
                                           quant)
        cache[key] = [add_initializer(graph, base + suffix, array) for suffix, array in zip(GATHER_SUFFIXES, arrays)]
    return cache[key]


def _weight_initializers(graph: ir.Graph, node: ir.Node, cache: dict[str, list[ir.Value]]) -> list[ir.Value]:
    """The transposed [q, scale[, zero point]] initializers of the placeholder's weight (made once per weight)."""
    quant, stored = _stored(node)
    if stored[0].name not in cache:
        base = stored[0].name.removesuffix("_codes")  # "<module>.weight"
        arrays = [value.const_value.numpy() for value in stored]
        cache[stored[0].name] = transposed_quantized_initializers(
            graph, [f"{base}.q", f"{base}.scale", f"{base}.zero_point"], quant, arrays[0], arrays[1],
            arrays[2] if len(arrays) > 2 else None)
    return cache[stored[0].name]


class FinishQuantizedMatMulsPass(ir.passes.InPlacePass):
    """Replace every traced QuantizedMatMul placeholder by DequantizeLinear + MatMul (module docstring), and
    every QuantizedGather (a quantized embedding lookup) by Gather and standard dequantization
    (quantized_embedding_export).

    A no-op on a graph without placeholders.
    """

    def __init__(self, fused_lookups: bool = False):
        super().__init__()
        self.fused_lookups = fused_lookups  # embedding lookups as com.microsoft.GatherBlockQuantized (target ort)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [node for node in graph if node.domain == TRACE_DOMAIN]
        model.opset_imports.pop(TRACE_DOMAIN, None)
        if not nodes:
            return ir.passes.PassResult(model, modified=False)
        if model.opset_imports.get("", 0) < QUANTIZED_MIN_OPSET:
            # opsets 19-21 only add types and float8 options to the ops traced graphs use
            model.opset_imports[""] = QUANTIZED_MIN_OPSET
        cache: dict[str, list[ir.Value]] = {}
        replaced = set()
        for node in nodes:
            if node.op_type == GATHER_OP:
                quant, _ = _stored(node)
                lookup, rows = lookup_nodes(node, _lookup_initializers(graph, node, cache), quant, self.fused_lookups)
                if self.fused_lookups:
                    model.opset_imports.setdefault(ORT_DOMAIN, 1)
                replaced.update(value for value in node.inputs[1:] if value is not None)
                ir.convenience.replace_nodes_and_values(graph, node, [node], lookup, node.outputs, [rows])
                continue
            if node.op_type != TRACE_OP:
                raise ValueError(f"unexpected {TRACE_DOMAIN} node {node.op_type}")
            block = node.attributes.get_int("block")
            weight = ir.node("DequantizeLinear", _weight_initializers(graph, node, cache),
                             attributes={"axis": 0, "block_size": block}, name=f"{node.name}.dequantize")
            matmul = ir.node("MatMul", [node.inputs[0], weight.outputs[0]], name=f"{node.name}.matmul")
            replaced.update(value for value in node.inputs[1:] if value is not None)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [weight, matmul], node.outputs,
                                                    matmul.outputs)
        for value in replaced:
            if value.is_initializer() and not value.uses() and not value.is_graph_output():
                del graph.initializers[value.name]
        return ir.passes.PassResult(model, modified=True)


__all__ = [
    "FinishQuantizedMatMulsPass",
    "TRACE_DOMAIN",
    "TRACE_OP",
    "register_trace_schema",
    "translate_quantized_matmul",
]
