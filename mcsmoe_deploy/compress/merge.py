"""Merging a group of experts into one: weighted averaging after alignment.

The weights of a group's members come from a weighting registered by name in WEIGHTINGS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..models import ExpertLayout, ExpertWeights
from .grouping import LayerGrouping
from .permute import align_to
from .registry import Registry

# weighting name -> weights(frequency [E], the group's members) -> one weight per member
WEIGHTINGS: Registry[Callable[[torch.Tensor, list[int]], list[float]]] = Registry("weighting")
register_weighting = WEIGHTINGS.register


@register_weighting("frequency")
def frequency_weights(frequency: torch.Tensor, members: list[int]) -> list[float]:
    """M-SMoE: each member weighs its routing frequency."""
    return [float(frequency[m]) for m in members]


@register_weighting("uniform")
def uniform_weights(frequency: torch.Tensor, members: list[int]) -> list[float]:
    """Plain average of the members."""
    return [1.0] * len(members)


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
    """The G merged experts of one layer, in fp32, from `experts` in any floating dtype (read in float64
    by alignment and averaging, so fp32 copies and bf16 views of the same weights give the same result).

    Each member is first aligned to its group's dominant expert (unless
    `permute` is False), then the group is averaged with the weights that
    WEIGHTINGS[weighting] gives: `frequency` (M-SMoE), equal ("uniform"), ...
    """
    member_weights = WEIGHTINGS.lookup(weighting)
    merged = []
    for group in range(grouping.num_groups):
        members = grouping.members(group)
        lead = experts[members[0]]
        aligned = [lead] + [align_to(lead, experts[m], layout) if permute else experts[m] for m in members[1:]]
        merged.append(merge_experts(aligned, member_weights(frequency, members)))
    return merged
