"""Attention and RMSNorm modules traced as onnxruntime's fused ops (export target "ort").

While `ort_modules_fused(model)` is active:
- every RMSNorm module (class name ending in RMSNorm, a `weight` and `variance_epsilon`)
  calls `mcsmoe_ort::rms_norm` -> `SimplifiedLayerNormalization`;
- every decoder attention module that fits calls its own q/k/v projections (whatever module
  they are: float or quantized linears), its q/k norms (Qwen3-MoE per head, OLMoE over the
  whole projection) and OLMoE's clip, then `mcsmoe_ort::rotary` -> `com.microsoft.RotaryEmbedding`
  with the graph's position_ids, then `mcsmoe_ort::gqa` -> `com.microsoft.GroupQueryAttention`,
  then its o_proj. (After tracing, `passes.packed_qkv` packs the three projections into one and moves
  the rotary into GroupQueryAttention where the layer allows.)

GroupQueryAttention reads padding from `seqlens_k`: rows are right-padded, each holding its real
tokens first, in the batch and in the cache (onnxruntime's layout, and onnxruntime-genai's). So the
graph reads only each row's length from the 2-D attention_mask (seqlens_k = ReduceSum(mask) - 1,
total_sequence_length = the mask's width, P + S) and the kernel masks the rest: no additive bias.
The runtime pads such a graph's batches on the right (`mcsmoe.padding_side` = "right" in its
metadata, see runtime.generation); the portable graph keeps transformers' left padding. The kernel
refuses a step of several tokens after a past for more than one row (onnxruntime 1.32: "batch_size
must be 1 when sequence_length > 1 and past context is given"); generation never takes one.

Sliding-window layers (Mixtral/Qwen3-MoE `sliding_window`, Qwen2-MoE's sliding layer types) get
GroupQueryAttention's `local_window_size` (see `local_window`).
When one attention module does not fit, every attention module keeps its transformers forward
(`FusionPlan.kept` says why; one graph cannot mix the two padding conventions): rotary
that depends on the sequence length (rope "dynamic"/"longrope"), cos/sin that are not two equal
halves, or a module without q/k/v/o projections.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import torch

from . import ort_ops  # noqa: F401  (registers the torch custom ops)

_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass
class FusionPlan:
    """Which modules trace to onnxruntime's fused ops: module names fused, and {name: why not} kept."""

    attention: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line, e.g. '4/4 attention as GroupQueryAttention, 9/9 RMSNorm fused'."""
        kept_attention = [name for name in self.kept if name.endswith(("self_attn", "attention"))]
        text = (f"{len(self.attention)}/{len(self.attention) + len(kept_attention)} attention as GroupQueryAttention, "
                f"{len(self.norms)} RMSNorm as SimplifiedLayerNormalization")
        if self.kept:
            reasons = sorted(set(self.kept.values()))
            text += f"; kept {len(self.kept)} module(s) as traced ({'; '.join(reasons)})"
        return text


class _GraphInputs:
    """Per-forward tensors every fused attention reads (set by the model's pre-hook)."""

    def __init__(self) -> None:
        self.seqlens_k = self.total_length = None

    def prepare(self, attention_mask: torch.Tensor) -> None:
        """attention_mask [B, P+S] of right-padded rows (1 = token, 0 = padding)."""
        self.seqlens_k = (attention_mask.sum(1) - 1).to(torch.int32)  # [B] real positions - 1
        self.total_length = torch.scalar_tensor(attention_mask.shape[1], dtype=torch.int32)


def _rotary_caches(model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | str:
    """cos, sin caches [max_positions, head_dim / 2] from the model's own rotary module, or why not."""
    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if rotary is None:
        return "no rotary_emb module"
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        return f"rope type {rope_type!r} depends on the sequence length"
    limit = int(getattr(model.config, "max_position_embeddings", 4096))
    positions = torch.arange(limit)[None]
    try:
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=dtype), positions)
    except (TypeError, ValueError) as error:  # a rotary module that needs more than (x, position_ids)
        return f"rotary_emb cannot be called with positions alone ({error})"
    cos, sin = cos[0].to(dtype), sin[0].to(dtype)
    half = cos.shape[-1] // 2
    if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        return "rotary cos/sin are not rotate-half (partial or interleaved rotary)"
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()


def local_window(config, layer_idx: int) -> int:
    """GroupQueryAttention's local_window_size for layer `layer_idx`: -1 (full causal), or W for a
    sliding window of W keys (transformers keeps key k for query q when q - W < k <= q; so does
    onnxruntime's kernel with local_window_size W)."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "model_type", "") == "olmoe":  # OLMoE builds a plain causal mask whatever the config says
        return -1
    if layer_types:
        sliding = layer_types[layer_idx] == "sliding_attention"
    else:  # Mixtral, Qwen3-MoE: the model builds a sliding mask whenever sliding_window is set
        sliding = window is not None
    return int(window) if sliding and window else -1


def _why_not_attention(module: torch.nn.Module) -> str | None:
    if not all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx")):
        return "attention without q/k/v/o projections"
    return None


def _fused_attention_forward(inputs: _GraphInputs, cos: torch.Tensor, sin: torch.Tensor):
    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise RuntimeError(f"{type(self).__name__} was called without position_ids: cannot trace fused rotary")
        batch, seq, _ = hidden_states.shape
        if isinstance(position_ids.shape[0], int) and position_ids.shape[0] == 1:
            # a graph without position_ids input: the model's own [1, S] arange; the kernel wants [B, S]
            position_ids = position_ids.expand(batch, -1)
        config, head_dim = self.config, self.head_dim
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if hasattr(self, "q_norm"):
            if self.q_norm.weight.numel() == head_dim:  # Qwen3-MoE: per head
                q = self.q_norm(q.view(batch, seq, heads, head_dim)).reshape(batch, seq, heads * head_dim)
                k = self.k_norm(k.view(batch, seq, kv_heads, head_dim)).reshape(batch, seq, kv_heads * head_dim)
            else:  # OLMoE: over the whole projection
                q, k = self.q_norm(q), self.k_norm(k)
        clip = getattr(config, "clip_qkv", None)
        if clip is not None:
            q, k, v = (t.clamp(min=-clip, max=clip) for t in (q, k, v))
        q = torch.ops.mcsmoe_ort.rotary(q, position_ids, cos, sin, heads)
        k = torch.ops.mcsmoe_ort.rotary(k, position_ids, cos, sin, kv_heads)
        layer = cache.layers[self.layer_idx] if cache is not None else None
        if layer is not None and getattr(layer, "keys", None) is not None:
            past_k, past_v = layer.keys, layer.values
        else:
            past_k = past_v = hidden_states.new_zeros(batch, kv_heads, 0, head_dim)
        out, present_k, present_v = torch.ops.mcsmoe_ort.gqa(
            q, k, v, past_k, past_v, inputs.seqlens_k, inputs.total_length, heads, kv_heads, float(self.scaling),
            local_window(config, self.layer_idx),
        )
        if layer is not None:  # the caller reads presents from the cache, as after cache.update
            layer.keys, layer.values = present_k, present_v
        return self.o_proj(out), None

    return forward


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return torch.ops.mcsmoe_ort.rms_norm(hidden_states, self.weight, float(self.variance_epsilon))


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight") and hasattr(
        module, "variance_epsilon")


def _is_attention(name: str, module: torch.nn.Module) -> bool:
    return name.endswith("self_attn") or (type(module).__name__.endswith("Attention") and hasattr(module, "q_proj"))


@contextlib.contextmanager
def ort_modules_fused(model: torch.nn.Module):
    """Within the block, fitting attention and RMSNorm modules trace to onnxruntime's fused ops; yields the FusionPlan.

    The model must be a transformers decoder called with keyword `attention_mask` (2-D, right-padded
    rows; the export wrappers do); see the module docstring.
    """
    plan = FusionPlan()
    dtype = next(model.parameters()).dtype
    inputs = _GraphInputs()
    caches = _rotary_caches(model, dtype)
    patched: list[tuple[torch.nn.Module, bool, object]] = []

    def patch(module: torch.nn.Module, forward) -> None:
        had_own = "forward" in vars(module)
        patched.append((module, had_own, vars(module).get("forward")))
        module.forward = types.MethodType(forward, module)

    def prepare(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            raise RuntimeError("the fused export calls the model with a keyword 2-D attention_mask")
        inputs.prepare(mask)

    attention = {name: caches if isinstance(caches, str) else _why_not_attention(module)
                 for name, module in model.named_modules() if _is_attention(name, module)}
    unfit = next((why for why in attention.values() if why is not None), None)
    hook = model.register_forward_pre_hook(prepare, with_kwargs=True)
    try:
        for name, module in model.named_modules():
            if _is_rms_norm(module):
                patch(module, _norm_forward)
                plan.norms.append(name)
            elif name in attention and unfit is None:
                patch(module, _fused_attention_forward(inputs, *caches))
                plan.attention.append(name)
            elif name in attention:  # all or none: a kept layer reads left-padded masks, a fused one right-padded
                plan.kept[name] = attention[name] or f"another attention layer is kept ({unfit})"
        yield plan
    finally:
        hook.remove()
        for module, had_own, old in patched:
            if had_own:
                module.forward = old
            else:
                del module.forward


__all__ = ["FusionPlan", "ort_modules_fused"]
