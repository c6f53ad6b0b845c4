"""Graph pass: dense SwiGLU `ai.mcsmoe::GroupedLowRankMoE` nodes -> onnxruntime's `com.microsoft.MoE`.

`mcsmoe export --target ort-fused` uses it to build the fastest dense baseline on
CPU: onnxruntime's MoE kernel routes each token to its k experts only, where our
reference function body runs every group on every token.

A node qualifies when it is gated, its activation is silu, its three projections are
dense, and `expert_to_group` is the identity initializer arange(E) (G = E: a dense,
uncompressed model). Facts about the kernel (onnxruntime 1.32 CPU, checked
numerically in tests/test_ort_fused.py):

- `router_probs` takes the raw router logits: the kernel applies softmax over the E
  experts, picks the top k and, with `normalize_routing_weights=1`, divides the k
  probabilities by their sum; the same routing as our op (docs/ops.md).
- `fc1_experts_weights` [E, 2I, H] holds gate and up interleaved per output row
  (`swiglu_fusion=1`, the only fused layout the CPU kernel accepts): row 2i is gate
  row i, row 2i+1 is up row i. `fc2_experts_weights` [E, H, I] is our `down` as is.
- Its SwiGLU is `G * sigmoid(alpha * G) * (L + beta)` with G, L clamped to
  `swiglu_limit`; alpha=1, beta=0 and no limit (the schema defaults) give plain
  `silu(gate) * up`. They are written explicitly so a changed default cannot alter
  the model (the GPT-OSS variant is alpha=1.702, beta=1, limit=7).
- The CPU kernel runs float32 only.
- On exactly tied probabilities the kernel prefers the higher expert index, ONNX
  TopK the lower; random logits never tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from ..grouped_experts import ProjectionSpec
from .moe_op import DOMAIN, OP_TYPE, MoEOpSpec

ORT_DOMAIN = "com.microsoft"
ORT_MOE = "MoE"
_GATED_PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class MoEFusion:
    """One GroupedLowRankMoE node found fusable: its sizes, routing and weight initializers.

    gate, up: initializers [E, I, H]; down: [E, H, I]; expert_to_group: [E] int64.
    """

    node_name: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    normalize_topk: bool
    gate: str
    up: str
    down: str
    expert_to_group: str


def _refuse(node: onnx.NodeProto, reason: str) -> ValueError:
    return ValueError(
        f"cannot map {DOMAIN}::{OP_TYPE} node {node.name!r} to {ORT_DOMAIN}::{ORT_MOE}: {reason}; "
        "--target ort-fused is only for dense SwiGLU models (export compressed models with the default target)"
    )


def _tensor_values(tensor: TensorProto, node: onnx.NodeProto) -> np.ndarray:
    if uses_external_data(tensor):
        # the bytes live in a file this pass cannot see; the pipeline always holds them in memory
        raise _refuse(node, f"initializer {tensor.name!r} is external data that is not loaded "
                            "(onnx.load the model with load_external_data=True first)")
    return numpy_helper.to_array(tensor)


def _projection_kinds(node: onnx.NodeProto) -> dict[str, str]:
    """Projection name -> kind from the node's overload, e.g. {"gate": "lowrank-sparse", "up": "dense"}."""
    # MoEOpSpec.overload: family_activation_kK_norm[_gG]_{name}-{kind}...; only the kinds contain "-"
    return dict(token.split("-", 1) for token in node.overload.split("_") if "-" in token)


def _plan_node(node: onnx.NodeProto, initializers: dict[str, TensorProto]) -> MoEFusion:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if not attrs.get("gated", 0):
        raise _refuse(node, "its experts are not gated (MoE's fused FC1 needs gate and up projections)")
    activation = attrs.get("activation", b"").decode()
    if activation != "silu":
        raise _refuse(node, f"activation {activation!r} is not silu")
    compressed = {name: kind for name, kind in _projection_kinds(node).items() if kind != "dense"}
    if compressed or len(node.input) != 6:
        detail = ", ".join(f"{name} is {kind}" for name, kind in compressed.items()) or f"{len(node.input)} inputs"
        raise _refuse(node, f"its projections are compressed ({detail}), not dense")

    gate, up, down = node.input[3:]
    e2g_name = node.input[2]
    for name in (e2g_name, gate, up, down):
        if name not in initializers:
            raise _refuse(node, f"input {name!r} is not an initializer")
    for name in (gate, up, down):
        weight = initializers[name]
        if weight.data_type != TensorProto.FLOAT:
            dtype = helper.tensor_dtype_to_np_dtype(weight.data_type)
            raise _refuse(node, f"weight {name!r} is {dtype}; onnxruntime's CPU MoE kernel runs float32 only")
        if len(weight.dims) != 3:
            raise _refuse(node, f"weight {name!r} has shape {list(weight.dims)}, not [G, out, in]")
    num_groups, inter, hidden = initializers[gate].dims
    expert_to_group = _tensor_values(initializers[e2g_name], node)
    num_experts = expert_to_group.size
    if not np.array_equal(expert_to_group, np.arange(num_experts)) or num_groups != num_experts:
        raise _refuse(node, f"expert_to_group is not the identity arange({num_experts}) over "
                            f"{num_groups} groups (merged or removed experts)")
    # rebuilding the dense spec checks top_k and every shape (the overload names the body, not checked:
    # its format may change with the body strategy)
    try:
        spec = MoEOpSpec(
            num_experts=num_experts, num_groups=num_groups, hidden_size=hidden, intermediate_size=inter,
            top_k=attrs.get("top_k", 0), gated=True, activation="silu",
            routing="softmax_topk_norm" if attrs.get("normalize_topk", 0) else "softmax_topk",
            projections=(
                ("gate", ProjectionSpec(inter, hidden)),
                ("up", ProjectionSpec(inter, hidden)),
                ("down", ProjectionSpec(hidden, inter)),
            ),
        )
    except ValueError as error:
        raise _refuse(node, str(error)) from None
    shapes = {name: list(initializers[name].dims) for name in (gate, up, down)}
    if list(shapes.values()) != [spec.input_shapes()[f"{p}_weight"] for p in _GATED_PROJECTIONS]:
        raise _refuse(node, f"weight shapes {shapes} do not fit gate/up [E, I, H], down [E, H, I]")
    return MoEFusion(
        node_name=node.name, num_experts=num_experts, hidden_size=hidden, intermediate_size=inter,
        top_k=spec.top_k, normalize_topk=spec.normalize_topk, gate=gate, up=up, down=down,
        expert_to_group=e2g_name,
    )


def plan_ort_fusion(model_proto: onnx.ModelProto) -> list[MoEFusion]:
    """Check every GroupedLowRankMoE node of the main graph and describe its fusion; changes nothing.

    Raises ValueError naming the first node that cannot become com.microsoft.MoE
    (compressed, not gated, not silu, merged/removed experts, not float32).
    """
    initializers = {t.name: t for t in model_proto.graph.initializer}
    return [
        _plan_node(node, initializers)
        for node in model_proto.graph.node
        if node.domain == DOMAIN and node.op_type == OP_TYPE
    ]


def _interleaved_fc1(gate: TensorProto, up: TensorProto) -> np.ndarray:
    """[E, 2I, H] float32 with fc1[:, 2i] = gate[:, i] and fc1[:, 2i + 1] = up[:, i] (swiglu_fusion=1)."""
    num_experts, inter, hidden = gate.dims
    fc1 = np.empty((num_experts, inter, 2, hidden), dtype="<f4")  # raw_data is little-endian
    fc1[:, :, 0] = numpy_helper.to_array(gate)  # each read is a temporary copy, dropped at once
    fc1[:, :, 1] = numpy_helper.to_array(up)
    return fc1.reshape(num_experts, 2 * inter, hidden)


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _unique_name(base: str, taken: set[str]) -> str:
    name, count = base, 1
    while name in taken:
        name, count = f"{base}_{count}", count + 1
    taken.add(name)
    return name


def _consumed_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name read by a node of `graph` or of its subgraphs, and the graph outputs."""
    used = {v.name for v in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                used |= _consumed_names(sub)
    return used


def _used_functions(graph: onnx.GraphProto) -> set[tuple[str, str, str]]:
    used = set()
    for node in graph.node:
        used.add((node.domain, node.op_type, node.overload))
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                used |= _used_functions(sub)
    return used


def _delete_where(field, doomed) -> None:
    """Delete the items of a repeated field for which `doomed(item)` holds, in place."""
    # by index, not clear-and-extend: extend would copy every kept tensor into the arena again
    for index in reversed(range(len(field))):
        if doomed(field[index]):
            del field[index]


def _drop_unused(model_proto: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove the `candidates` initializers nobody reads any more, our functions nobody calls,
    and the ai.mcsmoe opset import when nothing uses the domain."""
    graph = model_proto.graph
    dead = candidates - _consumed_names(graph)
    # with upb the removed tensors' bytes stay in the model's arena until the model is freed;
    # removing them still keeps them out of the saved file
    for field in (graph.initializer, graph.input, graph.value_info):
        _delete_where(field, lambda item: item.name in dead)
    called = _used_functions(graph)
    _delete_where(model_proto.functions,
                  lambda f: f.domain == DOMAIN and (f.domain, f.name, f.overload) not in called)
    if not any(domain == DOMAIN for domain, _, _ in called) and not any(
        f.domain == DOMAIN for f in model_proto.functions
    ):
        _delete_where(model_proto.opset_import, lambda opset: opset.domain == DOMAIN)


def fuse_moe_for_ort(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every GroupedLowRankMoE node into one com.microsoft.MoE node, in place; returns `model_proto`.

    The whole model is checked first (`plan_ort_fusion`), so a ValueError leaves it
    unchanged. Per node: fc1 = gate and up interleaved ([E, 2I, H], a new float32
    initializer), fc2 = the `down` initializer [E, H, I] unchanged, k = top_k,
    normalize_routing_weights = normalize_topk, SwiGLU set to plain silu(gate) * up.
    The router logits feed `router_probs` directly (the kernel applies the softmax).
    Afterwards the gate/up/expert_to_group initializers nothing else reads, our unused
    FunctionProtos and, when nothing uses it, the ai.mcsmoe opset import are removed,
    and `com.microsoft` version 1 is imported.

    Memory: weights are interleaved one block at a time, so the transient extra is about
    two copies of one block's gate + up. The fused tensors add gate + up bytes to the
    proto; with protobuf's upb backend the removed tensors' bytes are only returned when
    the model is freed (after saving), so the peak is about the model plus gate + up.
    """
    fusions = plan_ort_fusion(model_proto)
    if not fusions:
        return model_proto
    graph = model_proto.graph
    initializers = {t.name: t for t in graph.initializer}
    taken = _graph_names(graph)
    fc1_names: dict[tuple[str, str], str] = {}  # blocks that share gate and up share one fused tensor
    nodes = iter(fusions)
    for index, node in enumerate(graph.node):
        if not (node.domain == DOMAIN and node.op_type == OP_TYPE):
            continue
        fusion = next(nodes)
        key = (fusion.gate, fusion.up)
        if key not in fc1_names:
            fc1_names[key] = _unique_name(f"{fusion.gate}.swiglu_fc1", taken)
            fc1 = graph.initializer.add()  # written straight into the model: no standalone TensorProto copy
            fc1.name, fc1.data_type = fc1_names[key], TensorProto.FLOAT
            fc1.dims.extend([fusion.num_experts, 2 * fusion.intermediate_size, fusion.hidden_size])
            data = _interleaved_fc1(initializers[fusion.gate], initializers[fusion.up]).tobytes()
            fc1.raw_data = data
            del data
        fused = helper.make_node(
            ORT_MOE,
            # input, router_probs, fc1_experts_weights, fc1_experts_bias (none), fc2_experts_weights
            [node.input[0], node.input[1], fc1_names[key], "", fusion.down],
            list(node.output),
            name=node.name,
            domain=ORT_DOMAIN,
            k=fusion.top_k,
            normalize_routing_weights=int(fusion.normalize_topk),
            activation_type="swiglu",
            swiglu_fusion=1,  # interleaved gate/up rows
            activation_alpha=1.0,  # with beta 0 and no swiglu_limit: silu(gate) * up
            activation_beta=0.0,
        )
        graph.node[index].CopyFrom(fused)
    _drop_unused(model_proto, {name for f in fusions for name in (f.gate, f.up, f.expert_to_group)})
    if not any(o.domain == ORT_DOMAIN for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
    return model_proto


fuse_moe_for_ort.needs_weights = True  # it reads gate and up values (see torch_export.GraphPass)


__all__ = ["ORT_DOMAIN", "ORT_MOE", "MoEFusion", "fuse_moe_for_ort", "plan_ort_fusion"]
