"""The torch side of the GroupedLowRankMoE op: a torch custom op, its ONNX translation, and block patching.

During export each MoE block's forward is swapped for one that computes the router
logits and calls the torch custom op `mcsmoe::grouped_low_rank_moe` (eager: the reference
semantics; fake: shape only). A custom translation table maps that op to a bare
`ai.mcsmoe::GroupedLowRankMoE` node (an onnx OpSchema is registered so onnxscript accepts
it). torch.onnx inlines onnxscript functions, so `finish_custom_nodes` appends the node's
semantics afterwards as model-local FunctionProtos, one per overload.

The op carries the spec identity as an int key into a process-wide registry of
MoEOpSpec; the translation appends it to the `activation` attribute ("silu@3"), and
`finish_custom_nodes` turns it into the node's `overload`.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable

import onnx_ir as ir
import torch
import torch.nn.functional as F

from ..grouped_experts import GroupedLowRankExperts
from ..models.base import FamilyAdapter
from .moe_op import ACTIVATIONS, DOMAIN, OP_TYPE, OP_VERSION, MoEOpSpec, grouped_moe_function

TORCH_OP = "mcsmoe::grouped_low_rank_moe"
_KEY_SEP = "@"  # activation attribute "silu@<spec key>" between translation and _finish
_SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

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
# the torch custom op: eager = reference semantics, fake = shape only


def _project(spec_proj, tensors: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [T, in] or [G, T, in] -> [G, T, out] for every group."""
    if spec_proj.dense:
        return x @ tensors[0].transpose(1, 2)
    left, right = tensors[0], tensors[1]
    y = (x @ right.transpose(1, 2)) @ left.transpose(1, 2)
    if spec_proj.sparse_rows:
        rows, values = tensors[2], tensors[3]
        extra = x @ values.transpose(1, 2)  # [G, T, n]
        index = rows[:, None, :].expand_as(extra)
        y = y.scatter_add(2, index, extra)  # repeated rows accumulate, like index_add
    return y


def _reference(hidden, router_logits, expert_to_group, projections, key) -> torch.Tensor:
    spec = spec_for_key(key)
    probs = torch.softmax(router_logits.float(), dim=-1)
    top_w, top_i = torch.topk(probs, spec.top_k, dim=-1)
    if spec.normalize_topk:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    top_w = top_w.to(hidden.dtype)
    groups = expert_to_group[top_i]  # [T, k], -1: removed expert
    valid = groups >= 0
    weights = torch.zeros(hidden.shape[0], spec.num_groups, dtype=hidden.dtype, device=hidden.device)
    weights = weights.scatter_add(1, groups.clamp(min=0), torch.where(valid, top_w, torch.zeros_like(top_w)))
    # split the flat tensor list per projection
    per_proj, offset = {}, 0
    for name, proj in spec.projections:
        count = len(spec.projection_inputs(name))
        per_proj[name] = (proj, projections[offset : offset + count])
        offset += count
    act = ACT_FNS[spec.activation]

    def run(name, x):
        proj, tensors = per_proj[name]
        return _project(proj, tensors, x)

    if spec.gated:
        out = run("down", act(run("gate", hidden)) * run("up", hidden))
    else:
        out = run("wo", act(run("wi", hidden)))
    return (out * weights.T[:, :, None]).sum(0)  # [G, T, H] -> [T, H]


ACT_FNS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@torch.library.custom_op(TORCH_OP, mutates_args=())
def grouped_low_rank_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    expert_to_group: torch.Tensor,
    projections: list[torch.Tensor],
    spec_key: int,
) -> torch.Tensor:
    """The GroupedLowRankMoE semantics (docs/ops.md) of the spec registered under `spec_key`."""
    return _reference(hidden, router_logits, expert_to_group, projections, spec_key)


@grouped_low_rank_moe.register_fake
def _(hidden, router_logits, expert_to_group, projections, spec_key):
    return torch.empty_like(hidden)


# ---------------------------------------------------------------------------------------------
# ONNX translation: a bare custom-domain node


_opset_cache: list = []


def _custom_opset():
    # created after the schema is registered, so onnxscript knows the op
    if not _opset_cache:
        import onnxscript

        _opset_cache.append(onnxscript.values.Opset(DOMAIN, OP_VERSION))
    return _opset_cache[0]


def translate(hidden, router_logits, expert_to_group, projections, spec_key):
    spec = spec_for_key(spec_key)
    # all inputs by keyword: torch's _building._construct_named_inputs_and_attrs gives a
    # variadic parameter *all* positional args (right only when it is the first input),
    # so positional projection tensors would repeat hidden, router_logits, expert_to_group
    return _custom_opset().GroupedLowRankMoE(
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


def routing_for(adapter: FamilyAdapter, config) -> str:
    """The op's routing of a family: Mixtral always renormalises the top-k weights."""
    if adapter.family == "mixtral":
        return "softmax_topk_norm"
    return "softmax_topk_norm" if getattr(config, "norm_topk_prob", False) else "softmax_topk"


def projection_tensors(experts: GroupedLowRankExperts, spec: MoEOpSpec) -> list[torch.Tensor]:
    tensors = []
    for name, _ in spec.projections:
        proj = experts.projections[name]
        for input_name in spec.projection_inputs(name):
            tensors.append(getattr(proj, input_name[len(name) + 1 :]))
    return tensors


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
        if hasattr(self, "shared_expert"):  # Qwen2-MoE: sigmoid-gated dense shared expert
            out = out + F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(batch, seq, hidden_dim)

    return forward


@contextlib.contextmanager
def moe_blocks_as_custom_op(
    model: torch.nn.Module, adapter: FamilyAdapter, make_forward: ForwardFactory = patched_forward
):
    """Within the block, every MoE block calls the custom op; yields {layer name: MoEOpSpec}.

    `make_forward` builds each block's forward (default: flat tokens, router logits, the op;
    Switch Transformers passes its own to add expert capacity, see switch_export).
    """
    routing = routing_for(adapter, model.config)
    top_k = adapter.top_k(model.config)
    patched, specs = [], {}
    try:
        for layer in adapter.moe_layers(model):
            experts = layer.block.experts
            if not isinstance(experts, GroupedLowRankExperts):
                raise ValueError(f"{layer.name}: experts are {type(experts).__name__}, not GroupedLowRankExperts")
            spec = MoEOpSpec.from_experts(experts, top_k, routing)
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


def finish_custom_nodes(model: ir.Model, specs: list[MoEOpSpec]) -> ir.passes.PassResult:
    """After tracing, in place: turn the temporary spec-key attributes into overloads; add one function per overload.

    Also imports the op's domain and raises the IR version to 10 (function overloads need
    it). RuntimeError when a node lacks its key, or the graph's MoE nodes are not one per
    block of `specs`. Runs as `passes.custom_nodes.FinishCustomNodesPass` during export.
    """
    default_opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    functions: dict[str, ir.Function] = {}
    count = 0
    for node in model.graph:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        activation = node.attributes.get_string("activation", "")
        if _KEY_SEP not in activation:
            raise RuntimeError(f"GroupedLowRankMoE node {node.name} lacks its spec key")
        spec = spec_for_key(int(activation.rsplit(_KEY_SEP, 1)[1]))
        node.attributes["activation"] = ir.AttrString("activation", spec.activation)
        if len(node.inputs) != len(spec.input_names()):
            names = [value.name if value is not None else "" for value in node.inputs]
            raise RuntimeError(f"node {node.name}: inputs {names}, spec takes {spec.input_names()}")
        node.overload = spec.overload
        if spec.overload not in functions:
            functions[spec.overload] = ir.serde.deserialize_function(grouped_moe_function(spec, default_opset))
        count += 1
    if count != len(specs):
        raise RuntimeError(f"{count} GroupedLowRankMoE nodes in the graph for {len(specs)} MoE blocks")
    if any(domain == DOMAIN for domain, _, _ in model.functions):
        raise RuntimeError("the exporter inlined or emitted an ai.mcsmoe function of its own")
    for function in functions.values():
        model.functions[function.identifier()] = function
    model.opset_imports.setdefault(DOMAIN, OP_VERSION)
    model.ir_version = max(model.ir_version, 10)
    return ir.passes.PassResult(model, modified=bool(count))


__all__ = [
    "ForwardFactory",
    "TORCH_OP",
    "finish_custom_nodes",
    "moe_blocks_as_custom_op",
    "patched_forward",
    "projection_tensors",
    "routing_for",
    "spec_for_key",
    "spec_key",
    "translate",
]
