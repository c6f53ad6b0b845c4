"""Merging a group of experts into one: frequency-weighted averaging after alignment."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import ExpertLayout, ExpertWeights
from .grouping import LayerGrouping
from .permute import align_to


def merge_experts(experts: Sequence[ExpertWeights], weights: Sequence[float]) -> ExpertWeights:
    """W = sum_i w_i W_i / sum_i w_i per projection; uniform when every weight is 0."""
    weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if len(weights) != len(experts):
        raise ValueError(f"{len(experts)} experts but {len(weights)} weights")
    if weights.sum() <= 0:
        weights = torch.ones_like(weights)
    weights = weights / weights.sum()
    return {
        name: sum(float(w) * expert[name].double() for w, expert in zip(weights, experts)).float()
        for name in experts[0]
    }


def merge_layer(
    experts: list[ExpertWeights],
    grouping: LayerGrouping,
    frequency: torch.Tensor,
    layout: ExpertLayout,
    permute: bool = True,
    weighting: str = "frequency",
) -> list[ExpertWeights]:
    """The G merged experts of one layer.

    Each member is first aligned to its group's dominant expert (unless
    `permute` is False), then the group is averaged with weights
    `frequency` ("frequency", M-SMoE) or equal weights ("uniform").
    """
    if weighting not in ("frequency", "uniform"):
        raise ValueError(f"weighting must be 'frequency' or 'uniform', not {weighting!r}")
    merged = []
    for group in range(grouping.num_groups):
        members = grouping.members(group)
        lead = experts[members[0]]
        aligned = [lead] + [align_to(lead, experts[m], layout) if permute else experts[m] for m in members[1:]]
        weights = [float(frequency[m]) for m in members] if weighting == "frequency" else [1.0] * len(members)
        merged.append(merge_experts(aligned, weights))
    return merged
