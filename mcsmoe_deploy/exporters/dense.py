"""Dense (not compressed) checkpoints go through the same op: G = E groups, identity grouping."""

from __future__ import annotations

import torch

from ..grouped_experts import GroupedLowRankExperts
from ..models.base import FamilyAdapter


def group_dense_experts(model: torch.nn.Module, adapter: FamilyAdapter) -> int:
    """In place, replace every MoE block's experts with the equivalent `GroupedLowRankExperts.from_dense`.

    The model computes the same function afterwards (each expert is its own group, stored
    dense, in the experts' own dtype). Converted one block at a time, so at most one
    block's experts exist twice. Returns the number of blocks converted.
    """
    layout = adapter.expert_layout(model.config)
    converted = 0
    for layer in adapter.moe_layers(model):
        if isinstance(layer.block.experts, GroupedLowRankExperts):
            continue
        dtype = next(layer.block.experts.parameters()).dtype
        grouped = GroupedLowRankExperts.from_dense(
            layout, adapter.read_experts(layer.block), adapter.one_hot_dispatch, dtype
        )
        adapter.install_experts(layer.block, grouped.eval())
        converted += 1
    return converted


__all__ = ["group_dense_experts"]
