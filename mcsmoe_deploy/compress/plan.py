"""From routing statistics to a plan, and from a plan to a model with G compressed experts per layer.

`plan_compression` decides (groups per layer, who joins whom); `apply_plan`
rewrites the model layer by layer, so at most one layer's dense experts are
copied at a time and each layer's old experts are freed as soon as it is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..grouped_experts import GroupedLowRankExperts, ProjectionSpec
from ..models import ExpertLayout, ExpertWeights, FamilyAdapter
from .activation_aware import projection_input_moments
from .grouping import LayerGrouping, drop_least_used, group_by_similarity, group_randomly, groups_per_layer
from .lowrank import low_rank_sparse, rank_for_energy, rank_for_ratio, sparse_row_count
from .merge import merge_layer
from .recipe import CompressionRecipe
from .stats import RoutingStats


@dataclass
class LayerPlan:
    """One MoE layer's plan: its routing frequencies, its grouping and (once applied) its projections."""

    name: str
    frequency: list[float]
    grouping: LayerGrouping
    projections: dict[str, ProjectionSpec] = field(default_factory=dict)
    # sampled block inputs and their routing, for activation-aware compression (not saved)
    calibration_samples: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "num_groups": self.grouping.num_groups,
            "expert_to_group": self.grouping.expert_to_group,
            "dominant_experts": self.grouping.dominant_experts,
            "frequency": [round(f, 6) for f in self.frequency],
            "projections": {name: spec.to_dict() for name, spec in self.projections.items()},
        }


@dataclass
class CompressionPlan:
    family: str
    layers: list[LayerPlan]
    calibration_tokens: int


def plan_compression(stats: RoutingStats, num_experts: int, recipe: CompressionRecipe, family: str) -> CompressionPlan:
    """Group every layer's experts as the recipe says."""
    recipe.validate()
    target = recipe.experts if recipe.experts is not None else max(1, num_experts // 2)
    frequencies = [layer.frequency for layer in stats.layers]
    counts = groups_per_layer(frequencies, target, recipe.adaptive)
    generator = torch.Generator().manual_seed(recipe.seed)
    layers = []
    for layer_stats, num_groups in zip(stats.layers, counts):
        frequency = layer_stats.frequency
        if recipe.grouping == "random":
            grouping = group_randomly(frequency, num_groups, generator)
        elif recipe.grouping == "drop":
            grouping = drop_least_used(frequency, num_groups)
        else:
            grouping = group_by_similarity(frequency, layer_stats.similarity(recipe.similarity), num_groups)
        layers.append(
            LayerPlan(layer_stats.name, frequency.tolist(), grouping, calibration_samples=layer_stats.samples())
        )
    return CompressionPlan(family=family, layers=layers, calibration_tokens=stats.tokens)


def projection_spec(name: str, merged: list[ExpertWeights], layout: ExpertLayout, recipe: CompressionRecipe) -> ProjectionSpec:
    """How projection `name` of a layer is stored: one rank for all of the layer's groups."""
    out_features, in_features = layout.projection_shape(name)
    if recipe.rank_energy is not None:
        rank = rank_for_energy([expert[name] for expert in merged], recipe.rank_energy)
        if rank * (out_features + in_features) >= out_features * in_features:
            rank = None
    else:
        rank = rank_for_ratio(out_features, in_features, recipe.rank_ratio)
    if rank is None:
        return ProjectionSpec(out_features, in_features)
    return ProjectionSpec(out_features, in_features, rank, sparse_row_count(out_features, recipe.sparse_keep))


def build_grouped_experts(
    merged: list[ExpertWeights],
    expert_to_group: list[int],
    specs: dict[str, ProjectionSpec],
    layout: ExpertLayout,
    one_hot_dispatch: bool = False,
    input_moments: list[dict[str, torch.Tensor]] | None = None,
) -> GroupedLowRankExperts:
    """A GroupedLowRankExperts holding `merged` experts, each projection stored as `specs` says.

    With `input_moments` (per merged expert, {projection: E[x x^T] of its input}),
    low-rank factors are fitted activation-aware (see low_rank_sparse).
    """
    module = GroupedLowRankExperts(layout, expert_to_group, specs, one_hot_dispatch)
    if len(merged) != module.num_groups:
        raise ValueError(f"{len(merged)} merged experts for {module.num_groups} groups")
    with torch.no_grad():
        for name, spec in specs.items():
            target = module.projections[name]
            for group, expert in enumerate(merged):
                if spec.dense:
                    target.weight[group] = expert[name]
                    continue
                moment = input_moments[group][name] if input_moments is not None else None
                factors = low_rank_sparse(expert[name], spec.rank, spec.sparse_rows, moment)
                target.left[group] = factors.left
                target.right[group] = factors.right
                if spec.sparse_rows:
                    target.sparse_rows[group] = factors.sparse_rows
                    target.sparse_values[group] = factors.sparse_values
    return module


def apply_plan(
    model: nn.Module,
    adapter: FamilyAdapter,
    plan: CompressionPlan,
    recipe: CompressionRecipe,
    progress: bool = True,
) -> None:
    """Rewrite every MoE layer of `model` in place: align, merge, compress, install G experts."""
    layout = adapter.expert_layout(model.config)
    layers = adapter.moe_layers(model)
    if [layer.name for layer in layers] != [layer.name for layer in plan.layers]:
        raise ValueError("the plan was made for a different model")
    for layer, layer_plan in tqdm(list(zip(layers, plan.layers)), desc="merge and compress", unit="layer", disable=not progress):
        experts = adapter.read_experts(layer.block)
        merged = merge_layer(
            experts,
            layer_plan.grouping,
            torch.tensor(layer_plan.frequency),
            layout,
            permute=recipe.permute,
            weighting=recipe.weighting,
        )
        del experts
        specs = {name: projection_spec(name, merged, layout, recipe) for name in layout.projections}
        moments = None
        if recipe.activation_aware and not recipe.merge_only:
            if layer_plan.calibration_samples is None:
                raise ValueError("activation-aware compression needs routing statistics collected with keep_inputs > 0")
            moments = projection_input_moments(merged, layer_plan.calibration_samples, layer_plan.grouping, layout)
        module = build_grouped_experts(
            merged, layer_plan.grouping.expert_to_group, specs, layout, adapter.one_hot_dispatch, moments
        )
        device = adapter.router_weight(layer.block).device
        adapter.install_experts(layer.block, module.to(device))
        layer_plan.projections = specs
