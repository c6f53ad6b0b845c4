"""From routing statistics to a plan, and from a plan to a model with G compressed experts per layer.

`plan_compression` decides (groups per layer, who joins whom); `apply_plan`
rewrites the model layer by layer, so at most one layer's dense experts are
copied at a time and each layer's old experts are freed as soon as it is done,
and returns what it built (an AppliedPlan: groups, ranks and sparse rows per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import cast_saved_tensors
from ..grouped_experts import SHARED_BASE, GroupedLowRankExperts, GroupedProjection, ProjectionSpec
from ..models import ExpertLayout, ExpertWeights, FamilyAdapter
from .grouping import GROUPINGS, GroupingContext, LayerGrouping, groups_per_layer
from .lowrank import LOW_RANK_KINDS, low_rank_sparse, rank_for_energy, rank_for_ratio, sparse_row_count
from .merge import merge_layer
from .output_refit import refit_output_projections
from .recipe import CompressionRecipe
from .base_delta import base_delta, base_delta_rank_for_ratio
from .shared_basis import shared_basis, shared_rank_for_ratio, shared_side
from .stats import RoutingStats


@dataclass
class LayerPlan:
    """One MoE layer's plan: its routing frequencies and its grouping."""

    name: str
    frequency: list[float]
    grouping: LayerGrouping
    # sampled block inputs and their routing, for activation-aware compression (not saved)
    calibration_samples: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # the same tokens' inputs, router logits and picks, for the output refit (not saved; only when the recipe asks)
    refit_samples: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)


@dataclass
class CompressionPlan:
    """Every MoE layer's plan, from routing statistics over `calibration_tokens` tokens."""

    family: str
    layers: list[LayerPlan]
    calibration_tokens: int


@dataclass
class AppliedLayer:
    """What `apply_plan` built for one MoE layer: its grouping and how each projection is stored
    (rank and kept sparse rows per projection, or dense).

    router_rows: when the grouping removed experts, the experts (original indices, ascending) whose
    router rows were kept: the router then scores only those, and a token's top-k is taken among
    them (pruning as REAP defines it); None when no expert was removed.
    """

    name: str
    frequency: list[float]
    grouping: LayerGrouping
    projections: dict[str, ProjectionSpec]
    router_rows: list[int] | None = None

    @property
    def expert_to_group(self) -> list[int]:
        """The group of each expert the router scores (the kept ones when experts were removed)."""
        if self.router_rows is None:
            return self.grouping.expert_to_group
        return [self.grouping.expert_to_group[e] for e in self.router_rows]

    def to_dict(self) -> dict:
        """The layer's entry in the compressed checkpoint's config.json."""
        data = {
            "num_groups": self.grouping.num_groups,
            "expert_to_group": self.expert_to_group,
            "dominant_experts": self.grouping.dominant_experts,
            "frequency": [round(f, 6) for f in self.frequency],
            "projections": {name: spec.to_dict() for name, spec in self.projections.items()},
        }
        if self.router_rows is not None:
            data["router_rows"] = self.router_rows
        return data


@dataclass
class AppliedPlan:
    """What `apply_plan` built, layer by layer, from a plan over `calibration_tokens` tokens."""

    family: str
    layers: list[AppliedLayer]
    calibration_tokens: int


def plan_compression(stats: RoutingStats, num_experts: int, recipe: CompressionRecipe, family: str) -> CompressionPlan:
    """Group every layer's experts as the recipe says."""
    recipe.validate()
    recipe.check_model(num_experts)
    frequencies = [layer.frequency for layer in stats.layers]
    counts = groups_per_layer(frequencies, recipe.groups(num_experts), recipe.adaptive)
    group = GROUPINGS.lookup(recipe.grouping)
    context = GroupingContext(similarity=recipe.similarity, generator=torch.Generator().manual_seed(recipe.seed))
    layers = []
    for layer_stats, num_groups in zip(stats.layers, counts):
        grouping = group(layer_stats, num_groups, context)
        layers.append(
            LayerPlan(layer_stats.name, layer_stats.frequency.tolist(), grouping,
                      calibration_samples=layer_stats.samples(recipe.low_rank_inputs),
                      refit_samples=layer_stats.samples_with_logits(recipe.refit_tokens) if recipe.output_refit else None)
        )
    return CompressionPlan(family=family, layers=layers, calibration_tokens=stats.tokens)


def projection_spec(name: str, merged: list[ExpertWeights], layout: ExpertLayout, recipe: CompressionRecipe) -> ProjectionSpec:
    """How projection `name` of a layer is stored: one rank for all of the layer's groups.

    With `recipe.low_rank_basis` "shared", the factor on the hidden-size side is one for all groups
    (compress/shared_basis.py) at the rank that holds as many numbers as per-expert factors would;
    with "base-delta", a full-rank base shared by the groups plus each group's delta, at equal bytes too
    (compress/base_delta.py).
    """
    out_features, in_features = layout.projection_shape(name)
    if recipe.low_rank_basis == "base-delta" and not recipe.merge_only:
        rank = base_delta_rank_for_ratio(out_features, in_features, len(merged), recipe.rank_ratio)
        return ProjectionSpec(out_features, in_features, rank, sparse_row_count(out_features, recipe.sparse_keep),
                              shared=SHARED_BASE)
    if recipe.low_rank_basis == "shared" and not recipe.merge_only:
        side = shared_side(name, layout)
        rank = shared_rank_for_ratio(out_features, in_features, len(merged), side, recipe.rank_ratio)
        return ProjectionSpec(out_features, in_features, rank, sparse_row_count(out_features, recipe.sparse_keep),
                              shared=side)
    if recipe.rank_energy is not None:
        rank = rank_for_energy([expert[name] for expert in merged], recipe.rank_energy)
        if rank * (out_features + in_features) >= out_features * in_features:
            rank = None
    else:
        rank = rank_for_ratio(out_features, in_features, recipe.rank_ratio)
    if rank is not None and recipe.quantize is not None:
        rank = quantizable_rank(rank, min(out_features, in_features), recipe.quant_block)
    if rank is None:
        return ProjectionSpec(out_features, in_features)
    return ProjectionSpec(out_features, in_features, rank, sparse_row_count(out_features, recipe.sparse_keep))


def quantizable_rank(rank: int, full_rank: int, block: int) -> int | None:
    """`rank` rounded to a multiple of the quantization `block` (the left factor [out, r] is quantized
    along r): up, unless that passes the full rank; None (store dense) when no multiple fits."""
    up = -(-rank // block) * block
    if up <= full_rank:
        return up
    down = full_rank // block * block
    return down or None


def build_grouped_experts(
    merged: list[ExpertWeights],
    expert_to_group: list[int],
    specs: dict[str, ProjectionSpec],
    layout: ExpertLayout,
    one_hot_dispatch: bool = False,
    input_moments: list[dict[str, torch.Tensor]] | None = None,
    group_frequencies: list[float] | None = None,
) -> GroupedLowRankExperts:
    """A GroupedLowRankExperts holding `merged` experts, each projection stored as `specs` says.

    With `input_moments` (per merged expert, {projection: E[x x^T] of its input}),
    low-rank factors are fitted activation-aware (see low_rank_sparse).
    group_frequencies: each merged expert's routing share, the weights of a base-delta projection's
    base (None: the plain mean).
    """
    module = GroupedLowRankExperts(layout, expert_to_group, specs, one_hot_dispatch)
    if len(merged) != module.num_groups:
        raise ValueError(f"{len(merged)} merged experts for {module.num_groups} groups")
    with torch.no_grad():
        for name, spec in specs.items():
            target = module.projections[name]
            moments = None if input_moments is None else [m[name] for m in input_moments]
            if spec.has_base:
                _fill_base_delta(target, [expert[name] for expert in merged], spec, moments, group_frequencies)
                continue
            if spec.shared is not None:
                _fill_shared(target, [expert[name] for expert in merged], spec,
                             None if input_moments is None else [moments[name] for moments in input_moments])
                continue
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


def _fill_shared(target: GroupedProjection, weights: list[torch.Tensor], spec: ProjectionSpec,
                 moments: list[torch.Tensor] | None) -> None:
    """Fit a shared basis to one projection's merged weights and store it in `target`."""
    fitted = shared_basis(weights, spec.rank, spec.shared, spec.sparse_rows, moments)
    getattr(target, spec.shared).copy_(fitted.shared)
    own = "left" if spec.shared == "right" else "right"
    getattr(target, own).copy_(torch.stack(fitted.per_group))
    if spec.sparse_rows:
        target.sparse_rows.copy_(fitted.sparse_rows)
        target.sparse_values.copy_(fitted.sparse_values)


def _fill_base_delta(target: GroupedProjection, weights: list[torch.Tensor], spec: ProjectionSpec,
                     moments: list[torch.Tensor] | None, frequencies: list[float] | None) -> None:
    """Fit a base and per-group deltas to one projection's merged weights and store them in `target`."""
    fitted = base_delta(weights, spec.rank, spec.sparse_rows, moments, frequencies)
    target.base.copy_(fitted.base)
    target.left.copy_(fitted.left)
    target.right.copy_(fitted.right)
    if spec.sparse_rows:
        target.sparse_rows.copy_(fitted.sparse_rows)
        target.sparse_values.copy_(fitted.sparse_values)


def group_frequencies(frequency: list[float], grouping: LayerGrouping) -> list[float]:
    """Each group's routing share: the sum of its members' frequencies (removed experts count nowhere)."""
    shares = [0.0] * grouping.num_groups
    for expert, group in enumerate(grouping.expert_to_group):
        if group >= 0:
            shares[group] += frequency[expert]
    return shares


def apply_plan(
    model: nn.Module,
    adapter: FamilyAdapter,
    plan: CompressionPlan,
    recipe: CompressionRecipe,
    progress: bool = True,
) -> AppliedPlan:
    """Rewrite every MoE layer of `model` in place: align, merge, compress, install G experts.

    Experts the grouping removed (group -1) also lose their router rows, so the router picks its
    top-k among the remaining experts: pruning is then exact for the kept ones.

    Returns what was built: per layer its grouping and each projection's storage (rank, sparse rows).
    The plan itself is left as it was.
    """
    layout = adapter.expert_layout(model.config)
    layers = adapter.moe_layers(model)
    if [layer.name for layer in layers] != [layer.name for layer in plan.layers]:
        raise ValueError("the plan was made for a different model")
    low_rank = LOW_RANK_KINDS.lookup(recipe.low_rank)
    if recipe.output_refit and any(layer.refit_samples is None for layer in plan.layers):
        raise ValueError("output_refit needs the plan's calibration inputs: collect_routing_stats(..., "
                         "keep_inputs=recipe.calibration_inputs) and plan_compression with the same recipe")
    applied = []
    for layer, layer_plan in tqdm(list(zip(layers, plan.layers)), desc="merge and compress", unit="layer", disable=not progress):
        # views of the layer's weights as held (bf16 for a bf16 source): alignment and averaging read them in
        # float64 whatever their dtype, so fp32 copies of all E experts would only cost memory
        experts = adapter.read_experts(layer.block, copies=False)
        merged = merge_layer(
            experts,
            layer_plan.grouping,
            torch.tensor(layer_plan.frequency),
            layout,
            permute=recipe.permute,
            weighting=recipe.weighting,
        )
        kept = [e for e, g in enumerate(layer_plan.grouping.expert_to_group) if g >= 0]
        router_rows = kept if len(kept) < len(layer_plan.grouping.expert_to_group) else None
        built = AppliedLayer(layer_plan.name, layer_plan.frequency, layer_plan.grouping, {}, router_rows)
        if recipe.output_refit:  # before low rank, which then factors the refitted weights
            merged = refit_output_projections(experts, merged, layer_plan.refit_samples, adapter.routing(model.config),
                                              built.expert_to_group, router_rows, layout, recipe.refit_ridge)
        del experts
        built.projections = specs = {name: projection_spec(name, merged, layout, recipe) for name in layout.projections}
        moments = None
        if not recipe.merge_only:
            moments = low_rank.input_moments(merged, layer_plan.calibration_samples, layer_plan.grouping, layout)
        if router_rows is not None:
            adapter.keep_router_rows(layer.block, router_rows)
        module = build_grouped_experts(merged, built.expert_to_group, specs, layout, adapter.one_hot_dispatch, moments,
                                       group_frequencies(layer_plan.frequency, layer_plan.grouping))
        router = adapter.router_weight(layer.block)
        # merged and compressed in fp32 (read_experts upcasts); stored as the model holds its weights, so a
        # model held in bf16 never has more than one layer in fp32
        adapter.install_experts(layer.block, cast_saved_tensors(module.to(router.device), router.dtype))
        applied.append(built)
        # this layer's fp32 merged experts and input moments would otherwise live on through the next
        # layer's merge (the loop rebinds the names only once the next ones exist)
        del merged, moments, module
    return AppliedPlan(family=plan.family, layers=applied, calibration_tokens=plan.calibration_tokens)
