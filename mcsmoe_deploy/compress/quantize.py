"""The quantization stage: every merged expert's factors to blockwise int4 / int8 codes.

It runs last, after merging, low rank and distillation, on the GroupedLowRankExperts of a
compressed model; the arithmetic is quantization.py's, and the result is what
`load_compressed` of the saved checkpoint computes. Two methods, one stored format:
"rtn" rounds each weight to nearest; "gptq" (gptq.py) fits the codes to the calibration inputs
each expert sees, given a provider of input second moments called layer by layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..checkpoint import compressed_layers
from ..grouped_experts import GroupedLowRankExperts
from ..quantization import QuantSpec
from .gptq import gptq_projection
from .plan import AppliedPlan

# (layer index, its experts) -> {projection name: second moment of its inputs per group [G, in, in]};
# called for layer i after layers < i are quantized (gptq.ExpertInputMoments runs the model for it)
InputMoments = Callable[[int, GroupedLowRankExperts], Mapping[str, torch.Tensor]]


def quantize_experts(
    model: nn.Module, applied: AppliedPlan, quant: QuantSpec, input_moments: InputMoments | None = None
) -> AppliedPlan:
    """Replace every projection of `model`'s compressed experts by its quantized copy, in place.

    input_moments: None rounds to nearest; given, each layer's projections are quantized by GPTQ
    with the moments it returns for that layer (see gptq.py).
    Returns `applied` with each projection's spec carrying `quant` (what the checkpoint records).
    """
    modules = compressed_layers(model)
    if len(modules) != len(applied.layers):
        raise ValueError(f"the model has {len(modules)} compressed layers, the plan {len(applied.layers)}")
    layers = []
    for index, (experts, layer) in enumerate(zip(modules, applied.layers)):
        moments = None if input_moments is None else input_moments(index, experts)
        for name, projection in list(experts.projections.items()):
            experts.projections[name] = (projection.quantized(quant) if moments is None
                                         else gptq_projection(projection, quant, moments[name]))
        specs = {name: experts.projections[name].spec for name in layer.projections}
        layers.append(dataclasses.replace(layer, projections=specs))
    return dataclasses.replace(applied, layers=layers)


__all__ = ["InputMoments", "quantize_experts"]
