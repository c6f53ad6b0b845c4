"""Export Switch Transformers (encoder-decoder, top-1 routing with expert capacity) to two ONNX graphs.

Files written into `out_dir` (B batch, S encoder length, N new decoder tokens, P decoder
tokens already cached, L decoder layers, h heads, d = d_kv; int64 ids and masks, float
tensors in the model's dtype):

    encoder.onnx
        in   input_ids [B, S], attention_mask [B, S]
        out  encoder_hidden_states [B, S, d_model]
             present.{i}.encoder.key / .value [B, h, S, d]   for i < L
    decoder.onnx
        in   input_ids [B, N], encoder_attention_mask [B, S]
             past_key_values.{i}.decoder.key / .value [B, h, P, d]   (P may be 0)
             past_key_values.{i}.encoder.key / .value [B, h, S, d]
        out  logits [B, N, V]
             present.{i}.decoder.key / .value [B, h, P+N, d]

The names are optimum's. The cross-attention keys and values depend on the encoder
output alone, so the encoder graph computes them once (each decoder layer's
`EncDecAttention.k` / `.v` applied to the encoder output) and the decoder graph takes them
as pasts at every step, the first included: one decoder graph serves the first step
(P = 0, a zero-length self-attention past) and every later step, with no If node and no
encoder_hidden_states input. A caller feeds each `present.X` back as `past_key_values.X`;
the encoder's presents stay fixed for the whole generation. There is no decoder
attention mask: the decoder tokens of a batch are aligned (all start from
`decoder_start_token_id`), as in transformers' `generate()`.

Every MoE block is one `ai.mcsmoe::GroupedLowRankMoE` node (top_k 1, no renormalisation:
the weight is the top softmax probability). Switch's expert capacity stays outside the op,
as traced torch code around it that repeats transformers 5.23's router: in each call,
within each sequence, the tokens routed to one expert are counted in sequence order and
those past `expert_capacity` get a block output of exactly zero (the residual around the
block passes them through unchanged). Padding tokens count as well, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..contract import (
    DECODER_FILE,
    DOMAIN,
    ENCODER_FILE,
    OP_TYPE,
    decoder_past_names,
    decoder_present_names,
    encoder_present_names,
)
from ..models.base import FamilyAdapter
from ..models.kv_cache import forward_with_cache
from ..runtime.generation import GenerationConfig, generate
from ..runtime.ort_session import OrtSeq2SeqSession
from .moe_op import register_op_schema
from .custom_op import projection_tensors, spec_for_key
from .export_config import ExportConfig
from .torch_export import GraphSpec, export_with_custom_moe

_MAX_LEN = 8192  # upper bound of every dynamic length (Switch has no position table)


@dataclass(frozen=True)
class SwitchGeometry:
    """Decoder layers, attention heads and per-head size (d_kv) of a Switch config."""

    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> SwitchGeometry:
        return cls(config.num_decoder_layers, config.num_heads, config.d_kv)


@dataclass(frozen=True)
class SwitchExport:
    """What `export_switch` wrote."""

    encoder: Path
    decoder: Path
    geometry: SwitchGeometry
    encoder_moe_nodes: int
    decoder_moe_nodes: int


# ---------------------------------------------------------------------------------------------
# the MoE block during export: router, capacity, the op


def capacity_keep_mask(probs: torch.Tensor, capacity: int) -> torch.Tensor:
    """Which tokens Switch's top-1 router keeps: probs [B, S, E] -> bool [B, S].

    A token is kept when it is among the first `capacity` tokens of its sequence routed
    to its expert (argmax of `probs`), counted in sequence order.
    """
    choice = F.one_hot(probs.argmax(dim=-1), probs.shape[-1])  # [B, S, E]
    rank_in_expert = (choice.cumsum(dim=1) * choice).sum(dim=-1)  # 1 for an expert's first token
    return rank_in_expert <= capacity


def switch_moe_forward(adapter: FamilyAdapter, key: int):
    """The forward of a SwitchTransformersSparseMLP during export (a custom_op ForwardFactory).

    Router logits as transformers computes them (in `router_dtype`), the custom op on the
    flattened tokens, then zero for the tokens the capacity drops. It never calls the
    router module, whose forward reassigns `self.classifier` (`.to(dtype)`), which
    torch.export cannot trace.
    """
    spec = spec_for_key(key)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden_dim = hidden_states.shape
        router = self.router
        classifier = router.classifier
        bias = None if classifier.bias is None else classifier.bias.to(router.dtype)
        logits = F.linear(hidden_states.to(router.dtype), classifier.weight.to(router.dtype), bias)  # [B, S, E]
        # transformers takes the argmax after casting the probabilities back to the input dtype
        probs = torch.softmax(logits, dim=-1).to(hidden_states.dtype)
        kept = capacity_keep_mask(probs, router.expert_capacity)
        flat = hidden_states.reshape(-1, hidden_dim)
        out = torch.ops.mcsmoe.grouped_low_rank_moe(
            flat,
            logits.reshape(-1, logits.shape[-1]).to(hidden_states.dtype),
            self.experts.expert_to_group,
            projection_tensors(self.experts, spec),
            key,
        )
        out = out.reshape(batch, seq, hidden_dim)
        return torch.where(kept[..., None], out, torch.zeros_like(out))

    return forward


# ---------------------------------------------------------------------------------------------
# traced wrappers


def _split_heads(attention: torch.nn.Module, states: torch.Tensor, projection: torch.nn.Module) -> torch.Tensor:
    """[B, S, d_model] -> [B, h, S, d] as SwitchTransformersAttention shapes its keys and values."""
    batch, seq = states.shape[:2]
    return projection(states).view(batch, seq, -1, attention.key_value_proj_dim).transpose(1, 2)


class _EncoderWrapper(torch.nn.Module):
    """(ids, mask) -> (encoder_hidden_states, k0, v0, k1, v1, ...) of every decoder layer's cross-attention."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cross = []
        for block in self.model.decoder.block:
            attention = block.layer[1].EncDecAttention
            cross += [_split_heads(attention, hidden, attention.k), _split_heads(attention, hidden, attention.v)]
        return (hidden, *cross)


class _DecoderWrapper(torch.nn.Module):
    """(ids, encoder mask, [self k0, self v0, cross k0, cross v0, ...]) -> (logits, self k0', self v0', ...)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor, past: list[torch.Tensor]):
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import MoEModelOutput

        config = self.model.decoder.config
        self_cache, cross_cache = DynamicCache(config=config), DynamicCache(config=config)
        num_layers = len(past) // 4
        for i in range(num_layers):
            self_cache.update(past[4 * i], past[4 * i + 1], i)
            cross_cache.update(past[4 * i + 2], past[4 * i + 3], i)
        cache = EncoderDecoderCache(self_cache, cross_cache)
        cache.is_updated = dict.fromkeys(range(num_layers), True)  # cross-attention reads the cache only
        # The decoder reads encoder_hidden_states only for its shape (batch, encoder length) once
        # the cross-attention cache is filled: a zero-width stand-in carries that shape.
        cross_key = past[2]
        stand_in = cross_key.new_zeros(cross_key.shape[0], cross_key.shape[2], 0)
        out, cache = forward_with_cache(self.model, cache, encoder_outputs=MoEModelOutput(last_hidden_state=stand_in),
                                        attention_mask=encoder_attention_mask, decoder_input_ids=input_ids)
        presents = []
        for layer in cache.self_attention_cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


# ---------------------------------------------------------------------------------------------
# export


def _moe_nodes(model_proto) -> int:
    return sum((n.domain, n.op_type) == (DOMAIN, OP_TYPE) for n in model_proto.graph.node)


def export_switch(
    model: torch.nn.Module,
    adapter: FamilyAdapter,
    out_dir: str | Path,
    config: ExportConfig = ExportConfig(),
) -> SwitchExport:
    """Export a Switch Transformers model to `out_dir`/encoder.onnx and `out_dir`/decoder.onnx.

    `model`: a SwitchTransformersForConditionalGeneration whose MoE blocks hold
    GroupedLowRankExperts (a compressed checkpoint from `load_compressed`, or a dense one
    after `group_dense_experts`). Layout in the module docstring; batch and every length
    are dynamic. Both graphs are checked with onnx.checker full_check before they are saved.
    `config` (opset, graph passes, external data) applies to both graphs, as in
    `export_with_custom_moe`; `config.with_past` is not read (both graphs have KV cache). Target
    "ort" exports as "portable": T5-style attention has no GroupQueryAttention form.
    """
    if adapter.family != "switch_transformers":
        raise ValueError(f"export_switch exports Switch Transformers, not {adapter.family!r}")
    if not register_op_schema():
        raise RuntimeError("this onnx cannot register op schemas from Python; upgrade onnx")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.fuses_ort:
        config = replace(config, target="portable")
    geometry = SwitchGeometry.from_config(model.config)
    layers, heads, head_dim = geometry.num_layers, geometry.num_heads, geometry.head_dim
    dtype = next(model.parameters()).dtype
    # example sizes, all distinct so that torch.export relates no two dimensions by accident
    batch_size, enc_len, past_len, new_len = 2, 7, 5, 3
    generator = torch.Generator().manual_seed(0)
    enc_ids = torch.randint(0, model.config.vocab_size, (batch_size, enc_len), generator=generator)
    enc_mask = torch.ones_like(enc_ids)
    dec_ids = torch.randint(0, model.config.vocab_size, (batch_size, new_len), generator=generator)
    past = [
        torch.randn(batch_size, heads, past_len if ".decoder." in name else enc_len, head_dim, dtype=dtype,
                    generator=generator)
        for name in decoder_past_names(layers)
    ]
    batch = torch.export.Dim("batch", min=1, max=1024)
    enc_seq = torch.export.Dim("encoder_sequence", min=1, max=_MAX_LEN)
    dec_seq = torch.export.Dim("decoder_sequence", min=1, max=_MAX_LEN)
    past_seq = torch.export.Dim("past_sequence", min=0, max=_MAX_LEN)  # 0: the first decoder step
    past_dims = [{0: batch, 2: past_seq if ".decoder." in name else enc_seq} for name in decoder_past_names(layers)]

    was_training = model.training
    model.eval()
    try:
        # each graph patches only its own stack's MoE blocks, so the node count check in
        # export_with_custom_moe counts that stack's blocks
        encoder = GraphSpec(
            _EncoderWrapper(model).eval(), (enc_ids, enc_mask),
            ["input_ids", "attention_mask"], ["encoder_hidden_states", *encoder_present_names(layers)],
            ({0: batch, 1: enc_seq}, {0: batch, 1: enc_seq}),
        )
        decoder = GraphSpec(
            _DecoderWrapper(model).eval(), (dec_ids, enc_mask, past),
            ["input_ids", "encoder_attention_mask", *decoder_past_names(layers)],
            ["logits", *decoder_present_names(layers)],
            ({0: batch, 1: dec_seq}, {0: batch, 1: enc_seq}, past_dims),
        )
        encoder_proto = export_with_custom_moe(model.encoder, adapter, encoder, out_dir / ENCODER_FILE, config,
                                               switch_moe_forward)
        decoder_proto = export_with_custom_moe(model.decoder, adapter, decoder, out_dir / DECODER_FILE, config,
                                               switch_moe_forward)
    finally:
        model.train(was_training)
    return SwitchExport(
        out_dir / ENCODER_FILE, out_dir / DECODER_FILE, geometry, _moe_nodes(encoder_proto), _moe_nodes(decoder_proto)
    )


# ---------------------------------------------------------------------------------------------
# greedy generation in onnxruntime


def greedy_generate_switch_onnx(
    encoder_session,
    decoder_session,
    input_ids,
    max_new_tokens: int,
    attention_mask=None,
    decoder_start_token_id: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> np.ndarray:
    """Greedy decoding with the two graphs of `export_switch`: the new token ids [B, N], N <= max_new_tokens.

    encoder_session, decoder_session: onnxruntime InferenceSessions of encoder.onnx and
    decoder.onnx. input_ids, attention_mask: the encoder input [B, S] (mask default all ones).
    The decoder starts from `decoder_start_token_id` with zero-length self-attention pasts and
    the encoder's cross-attention presents, then feeds one token per step (the runtime's loop,
    `runtime.generate`, over an OrtSeq2SeqSession). With `eos_token_id` a row that has produced
    it continues with `pad_token_id`, and decoding stops once every row has (as transformers'
    `generate()`); without it, exactly `max_new_tokens` steps.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    session = OrtSeq2SeqSession.from_inference_sessions(encoder_session, decoder_session, decoder_start_token_id)
    decoder = session.decoder(session.encode(ids, mask.reshape(ids.shape)))
    stops = () if eos_token_id is None else (eos_token_id,)
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=stops, pad_token_id=pad_token_id)
    tokens = generate(decoder, [[decoder_start_token_id]] * len(ids), config).tokens
    width = max(len(row) for row in tokens)  # rows that stopped early are padded, as generate() does
    return np.array([row + [pad_token_id] * (width - len(row)) for row in tokens], dtype=np.int64)


__all__ = [
    "SwitchExport",
    "SwitchGeometry",
    "capacity_keep_mask",
    "export_switch",
    "greedy_generate_switch_onnx",
    "switch_moe_forward",
]
