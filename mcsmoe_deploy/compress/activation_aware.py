"""Input statistics for activation-aware compression (an option beyond the paper).

Low-rank factors that minimise the weight error ||W - L R|| treat every input
direction alike; the output error E||(W - L R) x||^2 only cares about directions
the calibration inputs take. For each merged expert this module gives, per
projection, C = E[x x^T] over the calibration tokens routed to the expert's group:
the block's hidden states for gate/up (wi), the expert's own hidden activations
(computed with the merged weights) for down (wo). Registered as the low-rank kind "activation-aware".
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from ..models import ExpertLayout, ExpertWeights
from .grouping import LayerGrouping
from .lowrank import register_low_rank

# a group that saw fewer calibration tokens than this is fitted to the whole layer's inputs
MIN_GROUP_TOKENS = 32


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """E[x x^T] [d, d] of the rows of x [n, d], in float64."""
    x = x.double()
    return x.T @ x / max(len(x), 1)


def routed_inputs(samples: tuple[torch.Tensor, torch.Tensor], grouping: LayerGrouping) -> list[torch.Tensor]:
    """Per group, the sampled block inputs [n_g, H] whose top-k picks include a member of the group."""
    inputs, assigned = samples
    expert_to_group = torch.tensor(grouping.expert_to_group)
    groups = torch.where(assigned >= 0, expert_to_group[assigned.clamp(min=0)], -1)
    per_group = []
    for group in range(grouping.num_groups):
        mine = inputs[(groups == group).any(dim=-1)]
        per_group.append(mine if len(mine) >= MIN_GROUP_TOKENS else inputs)
    return per_group


def expert_hidden(expert: ExpertWeights, x: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """The expert's hidden activations [n, I] on inputs x [n, H] (the input of down / wo)."""
    act = ACT2FN[layout.activation]
    x = x.to(expert[layout.input_projections[0]].dtype)
    if layout.gated:
        return act(x @ expert["gate"].T) * (x @ expert["up"].T)
    return act(x @ expert["wi"].T)


def projection_input_moments(
    merged: list[ExpertWeights],
    samples: tuple[torch.Tensor, torch.Tensor],
    grouping: LayerGrouping,
    layout: ExpertLayout,
) -> list[dict[str, torch.Tensor]]:
    """For each merged expert, {projection name: E[x x^T] of that projection's input}."""
    moments = []
    for expert, x in zip(merged, routed_inputs(samples, grouping)):
        x = x.to(expert[layout.input_projections[0]].device)
        block_input = second_moment(x)
        hidden = second_moment(expert_hidden(expert, x, layout))
        moments.append({name: block_input if name in layout.input_projections else hidden for name in layout.projections})
    return moments


@register_low_rank("activation-aware", needs_calibration_inputs=True)
def calibration_input_moments(
    merged: list[ExpertWeights],
    samples: tuple[torch.Tensor, torch.Tensor] | None,
    grouping: LayerGrouping,
    layout: ExpertLayout,
) -> list[dict[str, torch.Tensor]]:
    """Fit the factors to the calibration inputs each merged expert sees (see projection_input_moments)."""
    if samples is None:
        raise ValueError("activation-aware compression needs routing statistics collected with keep_inputs > 0")
    return projection_input_moments(merged, samples, grouping, layout)
