"""Export a compressed decoder-only model to one ONNX graph with KV-cache inputs and outputs.

The same graph serves prefill (past length P = 0) and decode (P > 0): inputs
`input_ids` [B, S], `attention_mask` [B, P+S], `position_ids` [B, S] (int64) and per layer
`past_key_values.{i}.key` / `.value` [B, kv_heads, P, head_dim]; outputs `logits` [B, S, V]
and `present.{i}.key` / `.value` [B, kv_heads, P+S, head_dim]. Inside the traced forward a
transformers DynamicCache is built from the explicit past tensors (`cache.update` appends
them to empty layers), so attention is the real transformers code; every MoE block is one
`ai.mcsmoe::GroupedLowRankMoE` node as in `export_compressed`.

P = 0: the past dimension is exported as a dynamic Dim with min=0 from a P = 5 example, so the
graph has no specialisation on P; onnxruntime concatenates the empty past with the new keys.
A prefill therefore feeds zero-length pasts (see `empty_past`); no separate prefill graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from ..contract import KVGeometry, past_names, present_names
from ..models import adapter_for_config
from ..models.base import FamilyAdapter
from ..models.kv_cache import forward_with_cache
from ..runtime.generation import GenerationConfig, generate
from ..runtime.ort_session import OrtDecoderSession
from .export_config import ExportConfig
from .torch_export import GraphSpec, export_graph


class _PastWrapper(torch.nn.Module):
    """(ids, mask, positions, [k0, v0, k1, v1, ...]) -> (logits, k0', v0', ...)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        # no config: plain full-length layers for every layer type. With the config, sliding-window
        # layers keep only the last window - 1 past positions, and present.N would stop matching
        # the contract's [B, kv_heads, P+S, head_dim] (the sliding mask is applied either way)
        cache = DynamicCache()
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out, cache = forward_with_cache(self.model, cache, input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids)
        presents = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def past_graph_spec(model: torch.nn.Module) -> GraphSpec:
    """The KV-cache graph of the module docstring; batch, sequence and past length (0 too) dynamic."""
    num_layers, kv_heads, head_dim = adapter_for_config(model.config).kv_geometry(model.config)
    batch_size, past_len, seq_len = 2, 5, 3
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), dtype=torch.long)
    mask = torch.ones(batch_size, past_len + seq_len, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq_len, dtype=torch.long)[None].expand(batch_size, -1).clone()
    dtype = next(model.parameters()).dtype
    past = [torch.randn(batch_size, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * num_layers)]
    limit = max(16, getattr(model.config, "max_position_embeddings", 4096))
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=limit)
    past_dim = torch.export.Dim("past", min=0, max=limit)
    total = torch.export.Dim("total", min=1, max=2 * limit)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, [{0: batch, 2: past_dim} for _ in past])
    return GraphSpec(
        _PastWrapper(model).eval(),
        (ids, mask, positions, past),
        ["input_ids", "attention_mask", "position_ids", *past_names(num_layers)],
        ["logits", *present_names(num_layers)],
        dynamic,
    )


def export_compressed_with_past(
    model: torch.nn.Module,
    adapter: FamilyAdapter,
    out_path: str | Path,
    config: ExportConfig = ExportConfig(),
) -> onnx.ModelProto:
    """Export a decoder-only model whose experts are GroupedLowRankExperts to one prefill + decode graph.

    See the module docstring for the inputs and outputs; batch, sequence and past length
    (including 0) are dynamic. `config` (opset, graph passes, external data) as in
    `export_compressed`. Returns the saved ModelProto (checked with full_check).
    """
    return export_graph(model, adapter, past_graph_spec, out_path, config)


def empty_past(num_layers: int, kv_heads: int, head_dim: int, batch: int = 1, dtype=np.float32) -> dict:
    """Zero-length past feeds for a prefill."""
    empty = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
    return {name: empty for name in past_names(num_layers)}


def greedy_generate_onnx(session, input_ids, max_new_tokens: int, num_layers: int, kv_heads: int, head_dim: int) -> list[int]:
    """Greedy decoding (batch 1) with an onnxruntime InferenceSession of a graph from
    `export_compressed_with_past`; the new token ids.

    The runtime's loop (`runtime.generate` over an OrtDecoderSession): a prefill of the prompt
    with zero-length pasts, then one token at a time with the previous step's presents as pasts.
    """
    decoder = OrtDecoderSession.from_inference_session(session, KVGeometry(num_layers, kv_heads, head_dim))
    prompt = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
    return generate(decoder, prompt, GenerationConfig(max_new_tokens=max_new_tokens)).tokens[0]


__all__ = [
    "empty_past",
    "export_compressed_with_past",
    "greedy_generate_onnx",
    "past_graph_spec",
]
