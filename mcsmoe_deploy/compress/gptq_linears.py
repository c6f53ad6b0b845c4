"""GPTQ for the linear layers outside the experts (attention q/k/v/o, a shared expert, the LM head).

Scope "all" quantizes these layers too; round to nearest treats every input channel alike, while
GPTQ (gptq.py) fits the codes to the second moment H = sum x x^T of the inputs each layer sees on
calibration text. `LinearInputMoments` collects H for every named layer in one pass of the model
over the first `max_tokens` calibration tokens (forward pre-hooks; nothing grows with the tokens),
before anything is quantized: on the embedded LM (int4, blocks of 16) collecting them again after
the experts were quantized, GPTQ's sequential order, gave no better perplexity (19.60 vs 19.52,
symmetric) for a second pass. `gptq_weight_for` turns a layer's H into the `QuantizeWeight`
function `quantize_linears` calls, so the stored format is round to nearest's.

Measured on the embedded LM, dense int4 of every layer, blocks of 16 (held-out perplexity, dense
fp32 18.90): these layers alone cost 19.48 round to nearest, 19.14 with GPTQ; with the experts by
GPTQ too, 19.52 -> symmetric, 19.16 asymmetric (round to nearest: 19.85 and 19.31).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import FamilyAdapter
from ..quantization import QuantizedWeight, QuantSpec
from ..quantized_linear import QuantizeWeight
from .gptq import DAMP, gptq_quantize
from .stats import forward_inputs


class LinearInputMoments:
    """Input second moments of named nn.Linear layers of a model, on calibration blocks.

    Called with layer names, it runs `model` on the first `max_tokens` tokens (whole blocks;
    None: all) of `blocks` [N, S] and returns {name: H [in, in] float64}, the sum of x x^T over
    every token position's input x [in] to that layer. Memory: one [in, in] matrix per layer.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, blocks: torch.Tensor, batch_size: int = 8,
                 progress: bool = True, max_tokens: int | None = None):
        self.model = model
        self.adapter = adapter
        self.blocks = blocks if max_tokens is None else blocks[: max(1, -(-max_tokens // blocks.shape[1]))]
        self.batch_size = batch_size
        self.progress = progress

    @torch.no_grad()
    def __call__(self, names: list[str]) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        handles = []
        for name in names:
            linear = self.model.get_submodule(name)
            sums[name] = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float64,
                                     device=linear.weight.device)

            def hook(module: nn.Module, args: tuple, name: str = name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] += x.T @ x

            handles.append(linear.register_forward_pre_hook(hook))
        device = next(self.model.parameters()).device
        try:
            self.model.eval()
            starts = range(0, len(self.blocks), self.batch_size)
            for start in tqdm(starts, desc="GPTQ inputs, linear layers", unit="batch", disable=not self.progress):
                batch = self.blocks[start : start + self.batch_size].to(device)
                self.model(**forward_inputs(self.model, self.adapter, batch))
        finally:
            for handle in handles:
                handle.remove()
        return sums


def gptq_weight_for(hessian: torch.Tensor, damp: float = DAMP) -> QuantizeWeight:
    """The QuantizeWeight function (weight [out, in], spec -> QuantizedWeight) that quantizes by GPTQ
    fitted to `hessian` [in, in], the layer's input second moment."""

    def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        return gptq_quantize(weight, hessian.to(weight.device), spec, damp)

    return quantize_weight


def gptq_weights(moments: Mapping[str, torch.Tensor]) -> dict[str, QuantizeWeight]:
    """{layer name: its GPTQ QuantizeWeight} for every layer of `moments` ({name: H [in, in]})."""
    return {name: gptq_weight_for(hessian) for name, hessian in moments.items()}


__all__ = ["LinearInputMoments", "gptq_weight_for", "gptq_weights"]
