"""q/k/v projections + two RotaryEmbedding nodes -> one packed projection and GroupQueryAttention's own rotary.

The target "ort" traces each attention as three projections of the normed hidden state, a
`com.microsoft.RotaryEmbedding` on q and on k (explicit position ids), then
`com.microsoft.GroupQueryAttention` (exporters/ort_ops). This pass rewrites a layer to what
onnxruntime-genai's builder emits: ONE projection with the q, k and v weights concatenated along
the output axis, fed to GroupQueryAttention as packed QKV ([B, S, (N + 2 KV) D], key and value
empty), with `do_rotary=1` and the same cos/sin caches. Five nodes per layer become two. The kernel
rotates each row's tokens at their own positions (past length + index: right-padded rows, what
target ort's graphs hold), which are the graph's `position_ids`; so it is not given them, and when
no node reads `position_ids` any more the graph input goes (the builder's graphs have none either).

Exactness: each output column of a MatMul is the same dot product whether the weight is packed
or not, and onnxruntime's kernel applies the rotary at those positions bit for bit as
RotaryEmbedding does (checked in tests/test_packed_qkv.py).

A layer is rewritten only when all of this holds, else left as it is:
- the head size is a multiple of 16 (onnxruntime's rotary inside GroupQueryAttention refuses others);
- the attention has no rotary of its own yet, and q and k come from RotaryEmbedding nodes (not
  interleaved) sharing position ids and caches, read by this attention only;
- q, k and v (before rotary) are each `MatMul(x, W)` of the same x, read once, with W either a
  float initializer [H, n] or `DequantizeLinear(codes, scales[, zero points])` of initializers
  blocked along the input axis (axis 0) with the same block size (the quantized linears: the
  codes, scales and zero points are concatenated; onnxruntime still fuses DQ + MatMul into
  MatMulNBits). Projections with a bias, q/k norms or a clip between projection and rotary
  (Qwen2-MoE, Qwen3-MoE, OLMoE) do not match and keep the three projections.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from ...contract import POSITION_IDS
from ..initializers import add_initializer
from ..ort_ops import ORT_DOMAIN

_GQA_INPUTS = 17  # query .. query_seqlens (ort_ops._op("GroupQueryAttention"))
_COS, _SIN, _POSITIONS = 7, 8, 9
_initializer = functools.partial(add_initializer, unique=True)


def _only_use(value: ir.Value, node: ir.Node) -> bool:
    uses = list(value.uses())
    return len(uses) == 1 and uses[0][0] is node


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def _weight(matmul: ir.Node) -> tuple[str, list[np.ndarray], dict] | None:
    """How a projection holds its weight, as (kind, arrays, attributes), or None when it cannot be packed:
    ("float", [W [H, n]], {}), ("dq", [codes, scales(, zero points)] [H or H / block, n], DequantizeLinear's
    attributes) or ("nbits", [B, scales(, zero points)], MatMulNBits' attributes but N); all initializers."""
    if matmul.op_type == "MatMulNBits" and matmul.domain == ORT_DOMAIN:
        inputs = list(matmul.inputs[1:])
        while inputs and inputs[-1] is None:
            inputs.pop()
        arrays = [_constant(v) for v in inputs]
        if len(arrays) not in (2, 3) or any(a is None for a in arrays):  # no g_idx, no bias
            return None
        attrs = {name: a.value for name, a in matmul.attributes.items() if name != "N"}
        return "nbits", arrays, attrs
    weight = matmul.inputs[1]
    array = _constant(weight)
    if array is not None:
        return ("float", [array], {}) if array.ndim == 2 and array.dtype.kind == "f" else None
    dq = weight.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "" or not _only_use(weight, matmul):
        return None
    arrays = [_constant(v) for v in dq.inputs]
    if any(a is None or a.ndim != 2 for a in arrays) or dq.attributes.get_int("axis", 1) != 0:
        return None
    attrs = {name: dq.attributes.get_int(name, 0) for name in ("axis", "block_size")}
    return "dq", arrays, attrs


def _projection(value: ir.Value, reader: ir.Node) -> ir.Node | None:
    """The MatMul (or MatMulNBits) producing `value` when `reader` is its only reader."""
    node = value.producer() if value is not None else None
    if node is None or not _only_use(value, reader):
        return None
    if (node.domain, node.op_type) not in (("", "MatMul"), (ORT_DOMAIN, "MatMulNBits")):
        return None
    return node


def _rotary(value: ir.Value, gqa: ir.Node) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "RotaryEmbedding" or node.domain != ORT_DOMAIN or not _only_use(value, gqa):
        return None
    if node.attributes.get_int("interleaved", 0) != 0 or len(node.inputs) != 4:
        return None
    return node


def _plan(gqa: ir.Node) -> tuple[ir.Node, ir.Node, list[ir.Node]] | None:
    """(q rotary, k rotary, [q, k, v MatMul]) when `gqa` can take packed QKV and do its own rotary."""
    inputs = list(gqa.inputs) + [None] * (_GQA_INPUTS - len(gqa.inputs))
    if gqa.attributes.get_int("do_rotary", 0) or any(inputs[i] is not None for i in (_COS, _SIN, _POSITIONS)):
        return None
    q_rot, k_rot = _rotary(inputs[0], gqa), _rotary(inputs[1], gqa)
    if q_rot is None or k_rot is None or list(q_rot.inputs[1:]) != list(k_rot.inputs[1:]):
        return None
    cos = q_rot.inputs[2].shape
    if cos is None or len(cos) != 2 or not isinstance(cos[1], int) or (2 * cos[1]) % 16:
        return None  # onnxruntime's kernel rotates head sizes that are multiples of 16 only
    matmuls = [_projection(q_rot.inputs[0], q_rot), _projection(k_rot.inputs[0], k_rot), _projection(inputs[2], gqa)]
    if any(m is None for m in matmuls) or len({m.inputs[0] for m in matmuls}) != 1:
        return None
    weights = [_weight(m) for m in matmuls]
    if any(w is None for w in weights) or len({(w[0], tuple(sorted(w[2].items())), len(w[1])) for w in weights}) != 1:
        return None
    if len({tuple(a.dtype for a in w[1]) for w in weights}) != 1:
        return None
    return q_rot, k_rot, matmuls


def _packed_projection(graph: ir.Graph, matmuls: list[ir.Node], base: str) -> list[ir.Node]:
    """Nodes computing x @ [Wq | Wk | Wv] from new initializers; the last one's output is the packed QKV."""
    kind, _, attrs = _weight(matmuls[0])
    parts = [_weight(m)[1] for m in matmuls]
    x = matmuls[0].inputs[0]
    if kind == "float":
        weight = _initializer(graph, f"{base}.weight", np.concatenate([p[0] for p in parts], axis=1))
        return [ir.Node("", "MatMul", [x, weight], name=f"{base}/MatMul")]
    if kind == "nbits":  # [N, ...] row-major over N: the rows of q, then k, then v
        packed = [_initializer(graph, f"{base}.weight.{suffix}", np.concatenate([p[i] for p in parts], axis=0))
                  for i, suffix in zip(range(len(parts[0])), ("q", "scales", "zero_points"))]
        n = sum(int(m.attributes.get_int("N", 0)) for m in matmuls)
        attributes = [ir.AttrInt64(name, value) for name, value in attrs.items()] + [ir.AttrInt64("N", n)]
        return [ir.Node(ORT_DOMAIN, "MatMulNBits", [x, *packed], attributes, name=f"{base}/MatMulNBits")]
    packed = [_initializer(graph, f"{base}.weight.{suffix}", np.concatenate([p[i] for p in parts], axis=1))
              for i, suffix in zip(range(len(parts[0])), ("q", "scale", "zero_point"))]
    dq = ir.Node("", "DequantizeLinear", packed, [ir.AttrInt64(k, v) for k, v in attrs.items()],
                 name=f"{base}/DequantizeLinear")
    return [dq, ir.Node("", "MatMul", [x, dq.outputs[0]], name=f"{base}/MatMul")]


def _base_name(gqa: ir.Node, matmul: ir.Node, index: int) -> str:
    """Name stem of the packed weight: the q projection's, q_proj -> qkv_proj, where it has one."""
    weight = matmul.inputs[1]
    source = weight.producer().inputs[0] if weight.producer() is not None else weight
    if source is not None and "q_proj" in (source.name or ""):
        return source.name.split("q_proj")[0] + "qkv_proj"
    return f"{gqa.name or f'attention_{index}'}.qkv_proj"


def _drop_unused_initializers(graph: ir.Graph, values: list[ir.Value]) -> None:
    for value in values:
        if value is not None and value.is_initializer() and not list(value.uses()) and value not in graph.outputs:
            graph.initializers.pop(value.name, None)


class PackedQKVPass(ir.passes.InPlacePass):
    """Pack q/k/v projections and move rotary into GroupQueryAttention (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for gqa in list(graph):
            if gqa.domain != ORT_DOMAIN or gqa.op_type != "GroupQueryAttention":
                continue
            plan = _plan(gqa)
            if plan is None:
                continue
            q_rot, k_rot, matmuls = plan
            old_weights = [v for m in matmuls for v in m.inputs[1:]]
            old_weights += [v for m in matmuls if m.inputs[1].producer() is not None
                            for v in m.inputs[1].producer().inputs]
            projection = _packed_projection(graph, matmuls, _base_name(gqa, matmuls[0], count))
            packed = projection[-1].outputs[0]
            packed.type = matmuls[0].outputs[0].type
            inputs = list(gqa.inputs) + [None] * (_GQA_INPUTS - len(gqa.inputs))
            inputs[0:3] = [packed, None, None]
            inputs[_COS], inputs[_SIN] = q_rot.inputs[2], q_rot.inputs[3]  # positions: the kernel's own
            while inputs and inputs[-1] is None:
                inputs.pop()
            attributes = [a for name, a in gqa.attributes.items() if name not in ("do_rotary", "rotary_interleaved")]
            attributes += [ir.AttrInt64("do_rotary", 1), ir.AttrInt64("rotary_interleaved", 0)]
            fused = ir.Node(ORT_DOMAIN, "GroupQueryAttention", inputs, attributes, num_outputs=len(gqa.outputs),
                            name=gqa.name)
            removed = [gqa, q_rot, k_rot, *matmuls]
            removed += [m.inputs[1].producer() for m in matmuls if m.inputs[1].producer() is not None]
            # outputs keep their names (present.* are graph outputs), shapes and types
            ir.convenience.replace_nodes_and_values(graph, gqa, removed, [*projection, fused],
                                                    list(gqa.outputs), list(fused.outputs))
            _drop_unused_initializers(graph, old_weights)
            count += 1
        positions = next((v for v in graph.inputs if v.name == POSITION_IDS), None)
        if count and positions is not None and not list(positions.uses()):
            graph.inputs.remove(positions)
        return ir.passes.PassResult(model, modified=bool(count))


__all__ = ["PackedQKVPass"]
