"""Placeholder nodes for quantized weights while tracing: `ai.mcsmoe.trace::QuantizedMatMul` / `QuantizedGather`.

A torch custom op reading stored codes (QuantizedLinear, QuantizedEmbedding) is translated to a bare
node of this domain, so no weight is traced as float; FinishQuantizedMatMulsPass replaces every such
node before the model is written. onnxscript emits only ops it has a schema of, hence the
registration. Both placeholders take (activation or ids, codes, scales[, zero points]) and the
attributes bits and block.
"""

from __future__ import annotations

import onnx

TRACE_DOMAIN = "ai.mcsmoe.trace"  # exists only between tracing and FinishQuantizedMatMulsPass
TRACE_VERSION = 1
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_placeholder(op: str, doc: str, first: tuple[str, str, str], rows: str, output: tuple[str, str],
                         along: str) -> bool:
    """Register placeholder `op`'s OpSchema with onnx (idempotent); False when onnx cannot register schemas.

    first: (name, type, shape) of its first input; rows, along: the stored weight's rows and the
    dimension its blocks run along ("out", "in"); output: (name, shape)."""
    if not hasattr(onnx.defs, "register_schema"):
        return False
    if onnx.defs.has(op, TRACE_VERSION, TRACE_DOMAIN):
        return True
    schema_cls = onnx.defs.OpSchema
    param, attr = schema_cls.FormalParameter, schema_cls.Attribute
    optional = schema_cls.FormalParameterOption.Optional
    schema = schema_cls(
        op, TRACE_DOMAIN, TRACE_VERSION, doc,
        inputs=[param(*first), param("codes", "tensor(uint8)", f"[{rows}, {along} * bits / 8] packed"),
                param("scales", "T", f"[{rows}, {along} / block]"),
                param("zero_points", "tensor(uint8)", f"[{rows}, {along} / block]; absent: symmetric",
                      param_option=optional)],
        outputs=[param(output[0], "T", output[1])],
        type_constraints=[("T", _FLOATS, "scales and the float result")],
        attributes=[attr("bits", schema_cls.AttrType.INT, "4 or 8"),
                    attr("block", schema_cls.AttrType.INT, f"values per block along {along}")],
    )
    onnx.defs.register_schema(schema)
    return True


_opset = None


def emit_placeholder(op: str, first_name: str, first, codes, scales, zero_points, bits: int, block: int):
    """The placeholder node `op` in a torch.onnx translation function (its schema registered first)."""
    global _opset
    if _opset is None:  # created after the schemas are registered, so onnxscript knows the ops
        import onnxscript

        _opset = onnxscript.values.Opset(TRACE_DOMAIN, TRACE_VERSION)
    inputs = {first_name: first, "codes": codes, "scales": scales}
    if zero_points is not None:
        inputs["zero_points"] = zero_points
    return getattr(_opset, op)(**inputs, bits=bits, block=block)


__all__ = ["TRACE_DOMAIN", "TRACE_VERSION", "emit_placeholder", "register_placeholder"]
