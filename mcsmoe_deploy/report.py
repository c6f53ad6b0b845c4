"""What runs measured, as plain dataclasses: a model's parameters and bytes (total, experts, per MoE
layer), and the demo's comparison of dense, merged, quantized and compressed models.

Printing them is summary.py's job; producing them is the stages' and the demo's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .grouped_experts import GroupedProjection
from .models import FamilyAdapter
from .quantized_embedding import QuantizedEmbedding
from .quantized_linear import QuantizedLinear


@dataclass
class LayerSize:
    name: str
    parameters: int
    bytes: int


@dataclass
class SizeReport:
    """Sizes of a model in numbers stored and bytes (parameters plus persistent buffers such as index maps)."""

    total_parameters: int
    total_bytes: int
    expert_parameters: int
    expert_bytes: int
    layers: list[LayerSize] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _tensors(module: nn.Module):
    seen = set()
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def _count(module: nn.Module, stored_dtype: torch.dtype | None = None) -> tuple[int, int]:
    # quantized factors are buffers of codes: count the weights they stand for as parameters
    quantized = sum(
        m.num_groups * sum(rows * cols for rows, cols in map(m.spec.factor_shape, m.spec.factors))
        for m in module.modules() if isinstance(m, GroupedProjection) and m.spec.quant is not None
    ) + sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, QuantizedLinear)) + sum(
        m.num_embeddings * m.embedding_dim for m in module.modules()
        if isinstance(m, QuantizedEmbedding) and not m.shares_codes_with)  # a tied table is its head's weight
    params = sum(t.numel() for t in module.parameters()) + quantized
    def item_bytes(t: torch.Tensor) -> int:
        return stored_dtype.itemsize if stored_dtype is not None and t.is_floating_point() else t.element_size()

    size = sum(t.numel() * item_bytes(t) for t in _tensors(module))
    return params, size


def size_report(model: nn.Module, adapter: FamilyAdapter, stored_dtype: torch.dtype | None = None) -> SizeReport:
    """Parameters and bytes of `model`, its routed experts (shared experts excluded) and each MoE layer's experts.

    stored_dtype: count floating tensors at this dtype's size (a model loaded in fp32 from a bf16
    checkpoint is reported at its bf16 bytes); None: as they are in memory.
    """
    total_params, total_bytes = _count(model, stored_dtype)
    layers = []
    for layer in adapter.moe_layers(model):
        params, size = _count(layer.block.experts, stored_dtype)
        layers.append(LayerSize(layer.name, params, size))
    return SizeReport(
        total_parameters=total_params,
        total_bytes=total_bytes,
        expert_parameters=sum(layer.parameters for layer in layers),
        expert_bytes=sum(layer.bytes for layer in layers),
        layers=layers,
    )


@dataclass
class DemoRow:
    """One model of the demo: sizes and held-out perplexity."""

    name: str
    parameters: int
    bytes: int
    expert_parameters: int
    expert_bytes: int
    perplexity: float


@dataclass
class ServingResult:
    """The demo's models exported, served with onnxruntime (CPU) and measured in one run, and a sample of each."""

    exports: list[Any]  # ExportReport per model, dense first
    bench: Any  # BenchReport, dense first
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (model, prompt, completion)


@dataclass
class DemoResult:
    """The demo's rows (dense first), timings in seconds, where the checkpoint went, and serving."""

    model_dir: str
    recipe: dict
    rows: list[DemoRow] = field(default_factory=list)
    compress_seconds: float = 0.0
    total_seconds: float = 0.0
    out_dir: str | None = None
    serving: ServingResult | None = None
