"""The torch side of the GroupedLowRankMoE op: a torch custom op, its ONNX translation, and block patching.

During export each MoE block's forward is swapped for one that computes the router
logits and calls the torch custom op `mcsmoe::grouped_low_rank_moe` (eager: the op's
routing, then the one torch reference `grouped_experts.grouped_moe_forward`; fake: shape
only); the family's adapter gives the routing and any shared expert. A custom translation
table maps that op to a bare `ai.mcsmoe::GroupedLowRankMoE` node (an onnx OpSchema is
registered so onnxscript accepts it). torch.onnx inlines onnxscript functions, so
`finish_custom_nodes` appends the node's semantics afterwards as model-local
FunctionProtos, one per overload.

The op carries the spec identity as an int key into a process-wide registry of
MoEOpSpec; the translation appends it to the `activation` attribute ("silu@3"), and
`finish_custom_nodes` turns it into the node's `overload`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import types
from collections.abc import Callable

import onnx_ir as ir
import torch
import torch.nn.functional as F

from ..contract import DOMAIN, OP_TYPE, OP_VERSION
from ..grouped_experts import GroupedLowRankExperts, grouped_moe_forward, route_top_k
from ..models.base import FamilyAdapter
from .moe_body import DEFAULT_STRATEGY
from .moe_body_picked import body_strategy
from .moe_op import grouped_moe_function
from .op_spec import MoEOpSpec
from .quantized_inputs import QUANTIZED_MIN_OPSET, split_quantized_inputs

TORCH_OP = "mcsmoe::grouped_low_rank_moe"
_KEY_SEP = "@"  # activation attribute "silu@<spec key>" between translation and _finish

_registry_lock = threading.Lock()
_SPECS: list[MoEOpSpec] = []


def spec_key(spec: MoEOpSpec) -> int:
    """Process-wide int key of `spec` (the custom op's last argument)."""
    with _registry_lock:
        if spec not in _SPECS:
            _SPECS.append(spec)
        return _SPECS.index(spec)


def spec_for_key(key: int) -> MoEOpSpec:
    return _SPECS[key]


# ---------------------------------------------------------------------------------------------
# the torch custom op: eager = the torch reference, fake = shape only


@torch.library.custom_op(TORCH_OP, mutates_args=())
def grouped_low_rank_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    expert_to_group: torch.Tensor,
    projections: list[torch.Tensor],
    spec_key: int,
) -> torch.Tensor:
    """The GroupedLowRankMoE semantics (docs/ops.md) of the spec registered under `spec_key`:
    hidden [T, H], router_logits [T, E] -> [T, H]."""
    spec = spec_for_key(spec_key)
    top_k_index, top_k_weights = route_top_k(router_logits, spec.top_k, spec.normalize_topk)
    return grouped_moe_forward(
        hidden,
        top_k_index,
        top_k_weights.to(hidden.dtype),
        expert_to_group,
        spec.layout,
        spec.split_projection_tensors(projections),
    )


@grouped_low_rank_moe.register_fake
def _(hidden, router_logits, expert_to_group, projections, spec_key):
    return torch.empty_like(hidden)


# ---------------------------------------------------------------------------------------------
# ONNX translation: a bare custom-domain node


_opset_cache: dict[int, object] = {}


def _custom_opset(version: int = OP_VERSION):
    # created after the schema is registered, so onnxscript knows the op
    if version not in _opset_cache:
        import onnxscript

        _opset_cache[version] = onnxscript.values.Opset(DOMAIN, version)
    return _opset_cache[version]


def translate(hidden, router_logits, expert_to_group, projections, spec_key):
    spec = spec_for_key(spec_key)
    # quantized: traced as version 2 with the stacked uint8 codes; finish_custom_nodes splits them per group
    # all inputs by keyword: torch's _building._construct_named_inputs_and_attrs gives a
    # variadic parameter *all* positional args (right only when it is the first input),
    # so positional projection tensors would repeat hidden, router_logits, expert_to_group
    return _custom_opset(spec.version).GroupedLowRankMoE(
        hidden=hidden,
        router_logits=router_logits,
        expert_to_group=expert_to_group,
        projection_tensors=tuple(projections),
        top_k=spec.top_k,
        # onnxscript drops attributes the schema does not declare, so the spec key rides on
        # `activation` ("silu@3") until _finish restores it
        activation=f"{spec.activation}{_KEY_SEP}{int(spec_key)}",
        gated=int(spec.gated),
        normalize_topk=int(spec.normalize_topk),
    )


# ---------------------------------------------------------------------------------------------
# patching MoE blocks during export


def projection_tensors(experts: GroupedLowRankExperts, spec: MoEOpSpec) -> list[torch.Tensor]:
    """The node's projection inputs of `experts`, flat, in `spec.input_names()` order."""
    return [tensor for name, _ in spec.projections for tensor in experts.projections[name].tensors()]


# builds the forward an MoE block runs during export: (adapter, spec key) -> forward(self, hidden_states)
ForwardFactory = Callable[[FamilyAdapter, int], Callable[..., torch.Tensor]]


def patched_forward(adapter: FamilyAdapter, key: int):
    spec = spec_for_key(key)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)
        logits = F.linear(flat, adapter.router_weight(self))
        out = torch.ops.mcsmoe.grouped_low_rank_moe(
            flat, logits, self.experts.expert_to_group, projection_tensors(self.experts, spec), key
        )
        shared = adapter.shared_expert_output(self, flat)  # e.g. Qwen2-MoE's gated dense expert
        if shared is not None:
            out = out + shared
        # batch as -1: the target shape then depends on seq alone, which every block shares, so onnxruntime
        # merges the blocks' shape nodes (batch would be read from a per-layer tensor)
        return out.reshape(-1, seq, hidden_dim)

    return forward


@contextlib.contextmanager
def moe_blocks_as_custom_op(
    model: torch.nn.Module, adapter: FamilyAdapter, make_forward: ForwardFactory = patched_forward
):
    """Within the block, every MoE block calls the custom op; yields {layer name: MoEOpSpec}.

    `make_forward` builds each block's forward (default: flat tokens, router logits, the op;
    Switch Transformers passes its own to add expert capacity, see switch_export).
    """
    routing = adapter.routing(model.config)
    patched, specs = [], {}
    try:
        for layer in adapter.moe_layers(model):
            experts = layer.block.experts
            if not isinstance(experts, GroupedLowRankExperts):
                raise ValueError(f"{layer.name}: experts are {type(experts).__name__}, not GroupedLowRankExperts")
            spec = MoEOpSpec.from_experts(experts, routing.top_k, routing.name)
            specs[layer.name] = spec
            had_own = "forward" in vars(layer.block)
            old = vars(layer.block).get("forward")
            layer.block.forward = types.MethodType(make_forward(adapter, spec_key(spec)), layer.block)
            patched.append((layer.block, had_own, old))
        yield specs
    finally:
        for block, had_own, old in patched:
            if had_own:
                block.forward = old
            else:
                del block.forward


# ---------------------------------------------------------------------------------------------
# after tracing


def finish_custom_nodes(model: ir.Model, specs: list[MoEOpSpec], per_group: bool = False) -> ir.passes.PassResult:
    """After tracing, in place: turn the temporary spec-key attributes into overloads; add one function per overload.

    per_group: float expert factors become per-group [in, out] initializers (op version 3, target
    ort): the body then slices no weight, so onnxruntime folds no per-group copy of it.

    Also imports the op's domain and raises the IR version to 10 (function overloads need
    it). RuntimeError when a node lacks its key, or the graph's MoE nodes are not one per
    block of `specs`. Runs as `passes.custom_nodes.FinishCustomNodesPass` during export.
    """
    default_opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    quantized = any(spec.quantized for spec in specs)
    if quantized and default_opset < QUANTIZED_MIN_OPSET:
        # blocked DequantizeLinear and int4 need opset 21; opsets 19-21 only add types and
        # float8 options to the ops the traced graph uses, so raising the import keeps its meaning
        default_opset = model.opset_imports[""] = QUANTIZED_MIN_OPSET
    functions: dict[str, ir.Function] = {}
    overloads: dict[str, list[MoEOpSpec]] = {}
    count, versions = 0, {model.opset_imports.get(DOMAIN, OP_VERSION)}
    for node in list(model.graph):
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        activation = node.attributes.get_string("activation", "")
        if _KEY_SEP not in activation:
            raise RuntimeError(f"GroupedLowRankMoE node {node.name} lacks its spec key")
        spec = spec_for_key(int(activation.rsplit(_KEY_SEP, 1)[1]))
        node.attributes["activation"] = ir.AttrString("activation", spec.activation)
        # a shared basis keeps its stacked per-group factor (version 3 either way; docs/ops.md)
        if per_group and not spec.shared_basis and any(p.quant is None for _, p in spec.projections):
            spec = dataclasses.replace(spec, per_group=True)
        versions.add(spec.version)
        if spec.quantized or spec.per_group:
            split_quantized_inputs(model.graph, node, spec)
        if len(node.inputs) != len(spec.input_names()):
            names = [value.name if value is not None else "" for value in node.inputs]
            raise RuntimeError(f"node {node.name}: inputs {names}, spec takes {spec.input_names()}")
        node.overload = spec.overload
        overloads.setdefault(spec.overload, []).append(spec)
        count += 1
    for overload, same in overloads.items():
        # blocks differing only in sizes share a body: picked_groups only if it suits each of them
        strategy = "picked_groups" if all(body_strategy(spec) == "picked_groups" for spec in same) else DEFAULT_STRATEGY
        functions[overload] = ir.serde.deserialize_function(grouped_moe_function(same[0], default_opset, strategy))
    if count != len(specs):
        raise RuntimeError(f"{count} GroupedLowRankMoE nodes in the graph for {len(specs)} MoE blocks")
    if any(domain == DOMAIN for domain, _, _ in model.functions):
        raise RuntimeError("the exporter inlined or emitted an ai.mcsmoe function of its own")
    for function in functions.values():
        model.functions[function.identifier()] = function
    model.opset_imports[DOMAIN] = max(versions)  # each version is a superset of the one before
    model.ir_version = max(model.ir_version, 10)
    return ir.passes.PassResult(model, modified=bool(count))


__all__ = [
    "ForwardFactory",
    "TORCH_OP",
    "finish_custom_nodes",
    "moe_blocks_as_custom_op",
    "patched_forward",
    "projection_tensors",
    "spec_for_key",
    "spec_key",
    "translate",
]
