"""Export a compressed decoder-only model to one ONNX logits graph with torch.onnx (dynamo).

Everything but the experts (embeddings, attention, norms, Qwen2-MoE's shared
expert and its gate) is traced from the real transformers model. Each MoE
block's forward is swapped, for the duration of the export, for one that
computes the router logits and calls the torch custom op
`mcsmoe::grouped_low_rank_moe`; a custom translation table maps that op to a
bare `ai.mcsmoe::GroupedLowRankMoE` node (an onnx OpSchema is registered so
onnxscript accepts it). torch.onnx inlines onnxscript functions, so the node's
semantics are appended afterwards as model-local FunctionProtos, one per overload.

The op carries the spec identity as an int key into a process-wide registry of
MoEOpSpec; the translation appends it to the `activation` attribute ("silu@3"), and it is
turned into the node's `overload` after export.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnx import helper

from ..grouped_experts import GroupedLowRankExperts
from ..models.base import FamilyAdapter
from .onnx_file import save_checked
from .moe_op import ACTIVATIONS, DOMAIN, OP_TYPE, OP_VERSION, MoEOpSpec, grouped_moe_function, register_op_schema

TORCH_OP = "mcsmoe::grouped_low_rank_moe"
_KEY_SEP = "@"  # activation attribute "silu@<spec key>" between translation and _finish
_SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

# a rewrite of a finished graph, applied before it is checked and saved
GraphPass = Callable[[onnx.ModelProto], onnx.ModelProto]

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


def _translate(hidden, router_logits, expert_to_group, projections, spec_key):
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


def _projection_tensors(experts: GroupedLowRankExperts, spec: MoEOpSpec) -> list[torch.Tensor]:
    tensors = []
    for name, _ in spec.projections:
        proj = experts.projections[name]
        for input_name in spec.projection_inputs(name):
            tensors.append(getattr(proj, input_name[len(name) + 1 :]))
    return tensors


# builds the forward an MoE block runs during export: (adapter, spec key) -> forward(self, hidden_states)
ForwardFactory = Callable[[FamilyAdapter, int], Callable[..., torch.Tensor]]


def _patched_forward(adapter: FamilyAdapter, key: int):
    spec = spec_for_key(key)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)
        logits = F.linear(flat, adapter.router_weight(self))
        out = torch.ops.mcsmoe.grouped_low_rank_moe(
            flat, logits, self.experts.expert_to_group, _projection_tensors(self.experts, spec), key
        )
        if hasattr(self, "shared_expert"):  # Qwen2-MoE: sigmoid-gated dense shared expert
            out = out + F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(batch, seq, hidden_dim)

    return forward


@contextlib.contextmanager
def moe_blocks_as_custom_op(
    model: torch.nn.Module, adapter: FamilyAdapter, make_forward: ForwardFactory = _patched_forward
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


class _LogitsWrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# export


def _finish(model_proto: onnx.ModelProto, specs: list[MoEOpSpec]) -> onnx.ModelProto:
    """Turn the temporary spec-key attribute into overloads; append one function per overload."""
    default_opset = next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))
    functions: dict[str, onnx.FunctionProto] = {}
    count = 0
    for node in model_proto.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        act = next((a for a in node.attribute if a.name == "activation"), None)
        if act is None or _KEY_SEP.encode() not in act.s:
            raise RuntimeError(f"GroupedLowRankMoE node {node.name} lacks its spec key")
        spec = spec_for_key(int(act.s.decode().rsplit(_KEY_SEP, 1)[1]))
        act.s = spec.activation.encode()
        if len(node.input) != len(spec.input_names()):
            raise RuntimeError(f"node {node.name}: inputs {list(node.input)}, spec takes {spec.input_names()}")
        node.overload = spec.overload
        if spec.overload not in functions:
            functions[spec.overload] = grouped_moe_function(spec, default_opset)
        count += 1
    if count != len(specs):
        raise RuntimeError(f"{count} GroupedLowRankMoE nodes in the graph for {len(specs)} MoE blocks")
    if any(f.domain == DOMAIN for f in model_proto.functions):
        raise RuntimeError("the exporter inlined or emitted an ai.mcsmoe function of its own")
    model_proto.functions.extend(functions.values())
    if not any(o.domain == DOMAIN for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    model_proto.ir_version = max(model_proto.ir_version, 10)  # function overloads need IR 10
    return model_proto


def export_compressed(
    model: torch.nn.Module,
    adapter: FamilyAdapter,
    out_path: str | Path,
    opset: int = 18,
    passes: Sequence[GraphPass] = (),
    external_data: bool | None = None,
) -> onnx.ModelProto:
    """Export a compressed decoder-only model (from `load_compressed`) to a logits graph.

    Inputs `input_ids`, `attention_mask` [B, S] int64, output `logits` [B, S, V], batch and
    sequence dynamic, no KV cache. Every MoE block's experts become one
    `ai.mcsmoe::GroupedLowRankMoE` node. `passes` rewrite the finished graph before it
    is saved (e.g. `fuse_moe_for_ort`); `external_data` as in `save_checked`. Returns the
    saved ModelProto (checked with onnx.checker full_check).
    """
    check_exportable(adapter, opset)
    wrapper = _LogitsWrapper(model).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 8), dtype=torch.long)
    mask = torch.ones_like(ids)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=max(16, getattr(model.config, "max_position_embeddings", 4096)))
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    return export_with_custom_moe(
        model, adapter, wrapper, (ids, mask), ["input_ids", "attention_mask"], ["logits"], dynamic, out_path, opset,
        passes, external_data,
    )


def check_exportable(adapter: FamilyAdapter, opset: int) -> None:
    if adapter.encoder_decoder or adapter.family not in _SUPPORTED:
        raise NotImplementedError(f"ONNX export of family {adapter.family!r} is not implemented yet")
    if opset < 18:
        raise ValueError("opset must be >= 18 (the op's function body needs it)")
    if not register_op_schema():
        raise RuntimeError("this onnx cannot register op schemas from Python; upgrade onnx")


def export_with_custom_moe(
    model, adapter, wrapper, args, input_names, output_names, dynamic_shapes, out_path, opset,
    passes: Sequence[GraphPass] = (), external_data: bool | None = None,
    make_forward: ForwardFactory = _patched_forward,
) -> onnx.ModelProto:
    """torch.onnx.export `wrapper(*args)` with MoE blocks as custom nodes; finish, apply `passes`, check, save."""
    out_path = Path(out_path)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), moe_blocks_as_custom_op(model, adapter, make_forward) as specs:
            program = torch.onnx.export(
                wrapper,
                tuple(args),
                dynamo=True,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                custom_translation_table={torch.ops.mcsmoe.grouped_low_rank_moe.default: _translate},
                optimize=True,
                verbose=False,
            )
    finally:
        model.train(was_training)
    model_proto = _finish(program.model_proto, list(specs.values()))
    del program  # its IR model holds a second copy of the weights
    for graph_pass in passes:
        model_proto = graph_pass(model_proto)
    save_checked(model_proto, out_path, external_data)
    return model_proto


__all__ = ["TORCH_OP", "export_compressed", "moe_blocks_as_custom_op", "routing_for", "spec_key"]
