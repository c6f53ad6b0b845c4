"""The custom op `ai.mcsmoe::GroupedLowRankMoE` (version 1) and its semantics as an ONNX function.

One node stands for a whole compressed MoE block's experts: routing from the
unchanged router logits, the expert -> group map, and G merged experts whose
projections are dense or low-rank plus structured-sparse rows (the torch
reference is `mcsmoe_deploy.grouped_experts.grouped_moe_forward` after the op's
routing `route_top_k`; the op spec is docs/ops.md; the node's MoEOpSpec is in op_spec).

The semantics ship inside the model as a model-local FunctionProto made of
standard ops, so a runtime with no kernel for the op inlines the body.
Bodies differ with the structure of a block (gated or not, activation, top-k,
normalisation, number of groups G, which projections are dense / low-rank / have
sparse rows), so each structure gets its own function under the same (domain,
name) told apart by the `overload` field (ONNX IR version >= 10); the node names
the same overload. Other sizes (E, H, I, ranks, row counts) are read from the
inputs, so blocks that differ only in those share one function.

Decomposition (built in moe_body.py; numbers in docs/ops.md): routing weights
[T, E] -> group weights [T, G] through a 0/1 membership matrix; then, unrolled over
the G groups, each group's routed tokens are gathered, run through that group's
expert alone and scatter-added back, weighted. Work follows routing (a group
without tokens runs 0-row MatMuls), and the per-group weight slices are constant
slices of the initializers, which runtimes fold once.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..contract import BASE_DELTA_OP_VERSION, DOMAIN, OP_TYPE, OP_VERSION, PER_GROUP_OP_VERSION, QUANTIZED_OP_VERSION
from .moe_body import build_body
from .moe_body_picked import body_strategy
from .op_spec import MoEOpSpec  # re-exported: the node's spec lives in op_spec

NODE_ATTRIBUTES = ("top_k", "activation", "gated", "normalize_topk")


def grouped_moe_function(spec: MoEOpSpec, opset: int = 18, strategy: str | None = None) -> onnx.FunctionProto:
    """The semantics of a GroupedLowRankMoE node with structure `spec`, from standard ops.

    `opset` must equal the model's default-domain opset (18 or newer): the body
    imports it and runtimes reject a function whose imports disagree with the model.
    Inputs as `spec.input_names()`, output "output" [T, H]. The body is `strategy`, by default
    `moe_body_picked.body_strategy(spec)`: gather_tokens (see the module docstring), or picked_groups for small
    float per-group blocks (an overload shared by blocks of several sizes: the exporter decides).
    """
    if opset < 18:
        raise ValueError("the function body needs opset >= 18 (ScatterElements/ScatterND reduction, ReduceSum axes)")
    function = helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=list(spec.input_names()),
        outputs=["output"],
        nodes=build_body(spec, strategy or body_strategy(spec)),
        opset_imports=[helper.make_opsetid("", opset)],
        # declared so the node may carry them; the body is specialised, not driven by them
        attributes=list(NODE_ATTRIBUTES),
        doc_string=f"{DOMAIN}::{OP_TYPE} v{spec.version} reference body ({spec.overload}); see docs/ops.md",
    )
    function.overload = spec.overload
    return function


def make_moe_node(spec: MoEOpSpec, input_names: list[str], output_name: str, name: str) -> onnx.NodeProto:
    """The GroupedLowRankMoE node of one MoE block; `input_names` in `spec.input_names()` order."""
    expected = spec.input_names()
    if len(input_names) != len(expected):
        raise ValueError(f"{len(input_names)} inputs given, the op takes {len(expected)}: {expected}")
    node = helper.make_node(
        OP_TYPE,
        list(input_names),
        [output_name],
        name=name,
        domain=DOMAIN,
        top_k=spec.top_k,
        activation=spec.activation,
        gated=int(spec.gated),
        normalize_topk=int(spec.normalize_topk),
    )
    node.overload = spec.overload  # selects the function body of this structure
    return node


def _infer_output(ctx) -> None:
    # output [T, H]: same type and shape as `hidden`
    ctx.set_output_type(0, ctx.get_input_type(0))


def register_op_schema() -> bool:
    """Register the op's OpSchema with onnx (checker, shape inference); idempotent.

    Returns True when the schema is (now or already) registered, False when the
    running onnx cannot register schemas from Python.
    """
    if not hasattr(onnx.defs, "register_schema"):
        return False
    for version in (OP_VERSION, QUANTIZED_OP_VERSION, PER_GROUP_OP_VERSION, BASE_DELTA_OP_VERSION):
        if not onnx.defs.has(OP_TYPE, version, DOMAIN) or onnx.defs.get_schema(OP_TYPE, version, DOMAIN).since_version != version:
            _register_version(version)
    return True


def _register_version(version: int) -> None:
    """Version 1: float projection tensors; version 2 adds quantized factors (docs/ops.md): per-group
    int4/uint4/int8/uint8 codes, and uint8 for the stacked codes of the traced node before its split;
    version 3 takes float factors per group too, transposed, and shared-basis factors (one float input
    without the group axis): same types as version 2; version 4 adds a base-delta projection's shared
    base [out, in] after its factors: same types."""
    quantized = ["tensor(int4)", "tensor(uint4)", "tensor(int8)", "tensor(uint8)"] if version > 1 else []
    schema_cls = onnx.defs.OpSchema
    param, attr = schema_cls.FormalParameter, schema_cls.Attribute
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = schema_cls(
        OP_TYPE,
        DOMAIN,
        version,
        "Grouped, merged, low-rank MoE experts with routing (docs/ops.md).",
        inputs=[
            param("hidden", "T", "[T, H]"),
            param("router_logits", "T", "[T, E]"),
            param("expert_to_group", "tensor(int64)", "[E], -1 = removed"),
            # per projection: weight, or left, right[, sparse_rows (int64), sparse_values]
            param(
                "projection_tensors",
                "V",
                "per projection in layout order: weight | left, right[, sparse_rows, sparse_values]",
                param_option=schema_cls.FormalParameterOption.Variadic,
                is_homogeneous=False,
                min_arity=2,
            ),
        ],
        outputs=[param("output", "T", "[T, H]")],
        type_constraints=[
            ("T", floats, "activations and weights"),
            ("V", floats + ["tensor(int64)"] + quantized,
             "projection tensors (sparse row indices are int64; v2, v3: quantized codes and zero points)"),
        ],
        attributes=[
            attr("top_k", schema_cls.AttrType.INT, "experts picked per token"),
            attr("activation", schema_cls.AttrType.STRING, "silu | relu | gelu | gelu_tanh"),
            attr("gated", schema_cls.AttrType.INT, "1: down(act(gate(x)) * up(x)); 0: wo(act(wi(x)))"),
            attr("normalize_topk", schema_cls.AttrType.INT, "1: divide the k weights by their sum"),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_output)
    onnx.defs.register_schema(schema)


def standalone_model(spec: MoEOpSpec, opset: int = 18, elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A one-node model whose graph inputs are the op's inputs (tests, benchmarks of a kernel)."""
    shapes = spec.input_shapes()

    def info(name: str) -> onnx.ValueInfoProto:
        dtype = TensorProto.INT64 if name == "expert_to_group" or name.endswith("_sparse_rows") else elem_type
        return helper.make_tensor_value_info(name, dtype, shapes[name])

    names = list(spec.input_names())
    graph = helper.make_graph(
        [make_moe_node(spec, names, "output", "moe")],
        "grouped_lowrank_moe",
        [info(n) for n in names],
        [helper.make_tensor_value_info("output", elem_type, ["T", spec.hidden_size])],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, spec.version)],
        functions=[grouped_moe_function(spec, opset)],
        # IR 10: function overloads
        ir_version=10,
    )
