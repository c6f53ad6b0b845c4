"""The pass behind `--target ort-qmoe`: quantized dense SwiGLU GroupedLowRankMoE nodes -> `com.microsoft.QMoE`.

A node qualifies when it is gated silu and each of its gate, up and down projections is dense
(not low rank) and blockwise quantized with one QuantSpec (int4 or int8, symmetric or not). Facts
about the kernel (onnxruntime 1.32 CPU, `QMoE` version 1 of `com.microsoft`; checked numerically
in tests/test_ort_qmoe.py):

- Weights per expert are [N, K * bits / 8] uint8 (row = output feature, K = input features), codes
  unsigned, two int4 codes per byte with the first in the low nibble: the checkpoint's own packing
  (quantization.pack_codes). Scales [E, N, K / block]. Without zero points a code means
  `(code - 2^(bits-1)) * scale`, the checkpoint's symmetric convention, so symmetric codes go in
  unchanged. Zero points [E, N, ceil(K / block * bits / 8)] uint8 (int4: packed like the codes,
  a row with an odd block count padded by one nibble) carry the asymmetric case.
- fc1 is gate and up interleaved per output row (`swiglu_fusion=1`): row 2i is gate row i, row
  2i+1 is up row i; fc2 is down. SwiGLU with alpha 1, beta 0 and no limit is `silu(gate) * up`.
- Routing: the kernel takes `router_probs` [T, E'], softmaxes it and picks the top k. On CPU it
  then always divides the k probabilities by their sum, whatever `normalize_routing_weights`
  says; only with the optional `router_weights` input and `normalize_routing_weights=0` does it
  use the gathered `router_weights` values as they are.
- Arithmetic: int4 with `accuracy_level=0` computes in float32 (parity ~3e-7 relative); at 4 (what
  the pass writes by default, as for MatMulNBits) it quantizes activations to int8 per block and
  runs MLAS's int8 kernels: about 1.5x faster decode on the benchmarks' 330 MB Mixtral, ~2% relative
  error on its logits, and a packed copy of the scales with per-block sums (~0.25 byte more per weight
  in the session; benchmarks/results/session-memory.md). Sessions opened with matmul_accuracy_level=0 (parity checks)
  rewrite the attribute. Blockwise int8 has no float32 kernel and quantizes activations to int8 at
  every level (~1% relative error on an MoE block's output).

Two routings, both exact:

- "logits": a dense renormalising block (expert_to_group the identity arange(E), normalize_topk)
  feeds its router logits as `router_probs`: the kernel's softmax, top-k and renormalisation are
  the op's routing.
- "group-weights": any other block (merged experts, removed experts, top-k not renormalised)
  computes the op's group weights a [T, G] with standard ops before the node (softmax, TopK,
  optional renormalisation, ScatterElements into [T, E], MatMul with the 0/1 membership [E, G]:
  picks landing in one group add) and feeds a as both `router_probs` (selection) and
  `router_weights` (mixing), with k = min(top_k, G). A token has at most top_k groups with a > 0,
  so the kernel's top k over G contain all of them; groups picked with a = 0 add 0. (A weight
  so small that exp(a) rounds to exp(0) in float32 ties with the empty groups and may be left
  out: its contribution is below float32 resolution.)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ...quantization import QuantSpec
from ..initializers import add_initializer, pack_unsigned, unique_name
from ..ort_ops import ORT_DOMAIN
from .matmul_nbits import DEFAULT_ACCURACY_LEVEL
from .requirements import mapping_refused, moe_nodes, overload_fields, planned_moe_nodes, require_moe_weights

_initializer = functools.partial(add_initializer, unique=True)  # routing constants are named per block

ORT_QMOE = "QMoE"
ROUTINGS = ("logits", "group-weights")
_GATED_PROJECTIONS = ("gate", "up", "down")
_QUANT_KIND = re.compile(r"^dense-(u?)int(4|8)b(\d+)$")  # MoEOpSpec.overload of a dense quantized projection


@dataclass(frozen=True)
class QMoEFusion:
    """One GroupedLowRankMoE node found fusable: sizes, routing and quantization.

    routing: "logits" (router logits fed to the kernel as they are) or "group-weights" (group
    weights [T, G] computed before the node, fed as router_probs and router_weights).
    top_k: the kernel's k, min(the op's top_k, G).
    """

    node_name: str
    num_experts: int
    num_groups: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    normalize_topk: bool
    quant: QuantSpec
    routing: str


def _refuse(node: ir.Node, reason: str) -> ValueError:
    return mapping_refused(node, f"{ORT_DOMAIN}::{ORT_QMOE}", reason,
                           "target 'ort-qmoe' is for quantized checkpoints with dense SwiGLU experts (export others with target 'ort' or 'portable')")


def _plan_node(node: ir.Node) -> QMoEFusion:
    attrs = node.attributes
    if not attrs.get_int("gated", 0) or attrs.get_string("activation", "") != "silu":
        raise _refuse(node, "its experts are not gated silu (QMoE's fused FC1 holds SwiGLU's gate and up)")
    num_groups, kinds = overload_fields(node)
    if num_groups is None:
        raise _refuse(node, f"its overload {node.overload!r} names no group count")
    quants = set()
    for name in _GATED_PROJECTIONS:
        match = _QUANT_KIND.match(kinds.get(name, ""))
        if match is None:
            raise _refuse(node, f"projection {name} is {kinds.get(name, 'missing')!r}, not dense and quantized")
        quants.add(QuantSpec(int(match[2]), int(match[3]), symmetric=not match[1]))
    if len(quants) != 1:
        raise _refuse(node, "its projections are quantized differently (QMoE takes one block size and "
                            "one zero-point convention)")
    (quant,) = quants
    parts = 2 if quant.symmetric else 3
    if len(node.inputs) != 3 + 3 * num_groups * parts:
        raise _refuse(node, f"{len(node.inputs)} inputs, not the {3 + 3 * num_groups * parts} of "
                            f"{num_groups} groups of dense quantized gate, up and down")
    for value in node.inputs[2:]:
        if value is None or not value.is_initializer() or value.const_value is None:
            raise _refuse(node, f"input {getattr(value, 'name', '')!r} is not an initializer")
    expert_to_group = node.inputs[2].const_value.numpy()
    num_experts = expert_to_group.size
    gate_q = node.inputs[3].const_value  # [H, I]: group 0's gate codes, transposed
    hidden, inter = gate_q.shape.numpy()
    top_k = attrs.get_int("top_k", 0)
    if not 1 <= top_k <= num_experts:
        raise _refuse(node, f"top_k {top_k} outside 1..{num_experts}")
    normalize = bool(attrs.get_int("normalize_topk", 0))
    identity = num_groups == num_experts and np.array_equal(expert_to_group, np.arange(num_experts))
    return QMoEFusion(
        node_name=node.name or "", num_experts=num_experts, num_groups=num_groups, hidden_size=int(hidden),
        intermediate_size=int(inter), top_k=min(top_k, num_groups), normalize_topk=normalize, quant=quant,
        routing="logits" if identity and normalize else "group-weights",
    )


def plan_qmoe(model: ir.Model) -> list[QMoEFusion]:
    """Check every GroupedLowRankMoE node of the main graph and describe its QMoE; changes nothing.

    Raises ValueError naming the first node that cannot become com.microsoft.QMoE (not gated
    silu, a projection low rank or not quantized, projections quantized differently).
    """
    return [_plan_node(node) for node in moe_nodes(model.graph)]


def _unsigned_codes(q: np.ndarray, quant: QuantSpec) -> np.ndarray:
    """The graph's per-group codes [in, out] (signed without zero point when symmetric) -> unsigned [out, in]."""
    codes = q.astype(np.int16).T
    return (codes + quant.symmetric_zero_point if quant.symmetric else codes).astype(np.uint8)


def _projection(node: ir.Node, index: int, fusion: QMoEFusion) -> list[np.ndarray]:
    """Projection `index` (0 gate, 1 up, 2 down) stacked over groups: [codes [G, out, in] unsigned,
    scales [G, out, in / block], zero points [G, out, in / block] or nothing]."""
    parts = 2 if fusion.quant.symmetric else 3
    start = 3 + index * fusion.num_groups * parts
    groups = [node.inputs[start + g * parts:start + (g + 1) * parts] for g in range(fusion.num_groups)]
    codes = np.stack([_unsigned_codes(group[0].const_value.numpy(), fusion.quant) for group in groups])
    stacked = [codes, np.stack([group[1].const_value.numpy().T for group in groups])]
    if not fusion.quant.symmetric:
        stacked.append(np.stack([group[2].const_value.numpy().astype(np.uint8).T for group in groups]))
    return stacked


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[G, I, ...] twice -> [G, 2I, ...] with row 2i from gate and row 2i+1 from up (swiglu_fusion=1)."""
    return np.stack([gate, up], axis=2).reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:])


def _qmoe_weights(graph: ir.Graph, node: ir.Node, fusion: QMoEFusion) -> list[ir.Value | None]:
    """fc1 weights, scales; fc2 weights, scales; fc1, fc2 zero points (None when symmetric) as new initializers."""
    bits = fusion.quant.bits
    gate, up, down = (_projection(node, i, fusion) for i in range(3))
    prefix = node.name or "moe"
    fc1 = _initializer(graph, f"{prefix}.qmoe_fc1", pack_unsigned(_interleave(gate[0], up[0]), bits))
    fc1_scales = _initializer(graph, f"{prefix}.qmoe_fc1_scales", _interleave(gate[1], up[1]))
    fc2 = _initializer(graph, f"{prefix}.qmoe_fc2", pack_unsigned(down[0], bits))
    fc2_scales = _initializer(graph, f"{prefix}.qmoe_fc2_scales", down[1])
    if fusion.quant.symmetric:
        return [fc1, fc1_scales, fc2, fc2_scales, None, None]
    fc1_zero = _initializer(graph, f"{prefix}.qmoe_fc1_zero_points", pack_unsigned(_interleave(gate[2], up[2]), bits))
    fc2_zero = _initializer(graph, f"{prefix}.qmoe_fc2_zero_points", pack_unsigned(down[2], bits))
    return [fc1, fc1_scales, fc2, fc2_scales, fc1_zero, fc2_zero]


def _group_weights(graph: ir.Graph, node: ir.Node, fusion: QMoEFusion) -> tuple[list[ir.Node], ir.Value]:
    """Standard ops computing the op's group weights a [T, G] from the router logits (docs/ops.md, steps 1-4)."""
    hidden, logits, expert_to_group = node.inputs[:3]
    prefix = node.name or "moe"
    membership = (expert_to_group.const_value.numpy()[:, None] == np.arange(fusion.num_groups)).astype(np.float32)
    member = _initializer(graph, f"{prefix}.qmoe_membership", membership)
    k = _initializer(graph, f"{prefix}.qmoe_top_k", np.array([node.attributes.get_int("top_k")], np.int64))
    nodes = []

    def add(op: str, inputs: list[ir.Value], *attributes: ir.Attr) -> ir.Value:
        new = ir.Node("", op, inputs, attributes, name=f"{prefix}/qmoe_routing/{op}_{len(nodes)}")
        new.outputs[0].name = unique_name(f"{prefix}.qmoe_routing.{len(nodes)}_{op.lower()}", graph)
        nodes.append(new)
        return new.outputs[0]

    routed = logits
    if logits.dtype not in (None, ir.DataType.FLOAT):
        routed = add("Cast", [logits], ir.AttrInt64("to", ir.DataType.FLOAT))
    probs = add("Softmax", [routed], ir.AttrInt64("axis", -1))  # in float32 like route_top_k
    top = ir.Node("", "TopK", [probs, k], [ir.AttrInt64("axis", -1)], num_outputs=2,
                  name=f"{prefix}/qmoe_routing/TopK")
    nodes.append(top)
    weights, index = top.outputs
    weights.name = unique_name(f"{prefix}.qmoe_routing.top_k_weights", graph)
    index.name = unique_name(f"{prefix}.qmoe_routing.top_k_experts", graph)
    if fusion.normalize_topk:
        weights = add("Div", [weights, add("ReduceSum", [weights, _initializer(
            graph, f"{prefix}.qmoe_axes", np.array([-1], np.int64))], ir.AttrInt64("keepdims", 1))])
    dense = add("ScatterElements", [add("Mul", [probs, _initializer(
        graph, f"{prefix}.qmoe_zero", np.zeros((), np.float32))]), index, weights], ir.AttrInt64("axis", 1))
    group_weights = add("MatMul", [dense, member])  # [T, G]; picks of one group add
    if hidden.dtype not in (None, ir.DataType.FLOAT):
        group_weights = add("Cast", [group_weights], ir.AttrInt64("to", hidden.dtype))
    return nodes, group_weights


class FuseQMoEPass(ir.passes.InPlacePass):
    """Rewrite every GroupedLowRankMoE node into one com.microsoft.QMoE node (in place).

    Requires: every MoE node's weight inputs readable. The whole graph is planned first
    (`plan_qmoe`), so a ValueError leaves the model unchanged. Per node: fc1 = gate and up
    codes interleaved [G, 2I, H * bits / 8], fc2 = down [G, H, I * bits / 8], their scales
    [G, N, K / block] (and zero points when asymmetric) as new initializers; k, SwiGLU as
    plain silu(gate) * up, expert_weight_bits, block_size, `accuracy_level` (module docstring),
    weights_prepacked 0 (the raw layout). Routing as the module docstring says.
    The replaced inputs, functions and the ai.mcsmoe import are left for the unused-removal
    passes (see `ort_qmoe_passes`).

    Memory: one block at a time, its codes unpacked to one byte each while repacked; the new
    tensors hold as many bytes as the per-group inputs they replace.

    int4_only: rewrite only the int4 blocks of dense SwiGLU experts (dense or merged, either routing)
    and leave every other node as it is instead of refusing it. Target "ort" does this
    (`ExportConfig.graph_passes`): at accuracy level 4 QMoE decodes such blocks faster than the op's
    body as MatMulNBits (merged G=4 of the 330 MB benchmark model: 0.77x against 0.93x the builder's
    int4; benchmarks/results/quantized-decode.md); low-rank and float blocks stay the op, int8 ones too
    (QMoE's int8 kernel always quantizes activations).
    """

    def __init__(self, int4_only: bool = False, accuracy_level: int = DEFAULT_ACCURACY_LEVEL):
        super().__init__()
        self.int4_only = int4_only
        self.accuracy_level = accuracy_level

    def _plan(self, model: ir.Model) -> list[tuple[ir.Node, QMoEFusion]]:
        """The nodes to rewrite and their plans; all of them, or (int4_only) the qualifying ones
        (others, e.g. low rank or float, stay the op, then MatMulNBits)."""
        int4 = (lambda plan: plan.quant.bits == 4) if self.int4_only else None
        return planned_moe_nodes(model.graph, _plan_node, int4)

    def requires(self, model: ir.Model) -> None:
        require_moe_weights(model, type(self).__name__, selective=self.int4_only)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        planned = self._plan(model)
        for node, fusion in planned:
            fc1, fc1_scales, fc2, fc2_scales, fc1_zero, fc2_zero = _qmoe_weights(graph, node, fusion)
            routing_nodes, router_weights = [], None
            router_probs = node.inputs[1]
            if fusion.routing == "group-weights":
                routing_nodes, router_probs = _group_weights(graph, node, fusion)
                router_weights = router_probs
            qmoe = ir.Node(
                ORT_DOMAIN, ORT_QMOE,
                # input, router_probs, fc1 weights, scales, bias; fc2 ...; fc3 ... (none);
                # fc1, fc2, fc3 zero points; router_weights
                [node.inputs[0], router_probs, fc1, fc1_scales, None, fc2, fc2_scales, None, None, None, None,
                 fc1_zero, fc2_zero, None, router_weights],
                [
                    ir.AttrInt64("k", fusion.top_k),
                    # the CPU kernel renormalises softmax routing regardless; 0 keeps router_weights as given
                    ir.AttrInt64("normalize_routing_weights", int(fusion.routing == "logits")),
                    ir.AttrString("activation_type", "swiglu"),
                    ir.AttrInt64("swiglu_fusion", 1),  # interleaved gate/up rows
                    ir.AttrFloat32("activation_alpha", 1.0),  # with beta 0 and no swiglu_limit: silu(gate) * up
                    ir.AttrFloat32("activation_beta", 0.0),
                    ir.AttrInt64("expert_weight_bits", fusion.quant.bits),
                    ir.AttrInt64("block_size", fusion.quant.block),
                    ir.AttrInt64("accuracy_level", self.accuracy_level),
                    ir.AttrInt64("weights_prepacked", 0),
                ],
                num_outputs=len(node.outputs),
                name=node.name,
            )
            new_nodes = [*routing_nodes, qmoe]
            ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, node.outputs, qmoe.outputs)
        if planned:
            model.opset_imports.setdefault(ORT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(planned))


def ort_qmoe_passes(int4_only: bool = False, accuracy_level: int = DEFAULT_ACCURACY_LEVEL
                    ) -> list[ir.passes.PassBase]:
    """The fusion (see FuseQMoEPass for `int4_only` and `accuracy_level`) and the clean-up after it:
    replaced weights, the op's functions and its opset import go."""
    from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

    return [FuseQMoEPass(int4_only, accuracy_level), RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(),
            RemoveUnusedOpsetsPass()]


def qmoe_refusal(section: dict) -> str | None:
    """Why a compressed checkpoint's `mcsmoe` config section cannot export to QMoE, or None when it can.

    Every layer's projections must be dense (not low rank) and quantized with one QuantSpec.
    """
    for layer_name, layer in section.get("layers", {}).items():
        projections = layer.get("projections", {})
        quants = []
        for name, proj in projections.items():
            if proj.get("rank") is not None:
                return f"layer {layer_name} stores {name} low rank (rank {proj['rank']}); QMoE takes dense experts"
            if not proj.get("quant"):
                return f"layer {layer_name} stores {name} in float; QMoE takes quantized experts"
            quants.append(QuantSpec.from_dict(proj["quant"]))
        if len(set(quants)) > 1:
            return (f"layer {layer_name} quantizes its projections differently; QMoE takes one bits, block and "
                    "zero-point setting")
    return None


__all__ = ["ORT_DOMAIN", "ORT_QMOE", "ROUTINGS", "FuseQMoEPass", "QMoEFusion", "ort_qmoe_passes", "plan_qmoe",
           "qmoe_refusal"]
