"""The quantization stage: every merged expert's factors to blockwise int4 / int8 codes (round to nearest).

It runs last, after merging, low rank and distillation, on the GroupedLowRankExperts of a
compressed model; the arithmetic is quantization.py's, and the result is what
`load_compressed` of the saved checkpoint computes.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..checkpoint import compressed_layers
from ..quantization import QuantSpec
from .plan import AppliedPlan


def quantize_experts(model: nn.Module, applied: AppliedPlan, quant: QuantSpec) -> AppliedPlan:
    """Replace every projection of `model`'s compressed experts by its quantized copy, in place.

    Returns `applied` with each projection's spec carrying `quant` (what the checkpoint records).
    """
    modules = compressed_layers(model)
    if len(modules) != len(applied.layers):
        raise ValueError(f"the model has {len(modules)} compressed layers, the plan {len(applied.layers)}")
    layers = []
    for experts, layer in zip(modules, applied.layers):
        for name, projection in list(experts.projections.items()):
            experts.projections[name] = projection.quantized(quant)
        specs = {name: experts.projections[name].spec for name in layer.projections}
        layers.append(dataclasses.replace(layer, projections=specs))
    return dataclasses.replace(applied, layers=layers)


__all__ = ["quantize_experts"]
