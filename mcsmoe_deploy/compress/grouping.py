"""Dominant experts and their groups.

In each layer the G most used experts are dominant; every other expert joins
the dominant expert it is most similar to. With an adaptive budget, one global
frequency threshold over all layers picks the dominant experts, so busy layers
keep more groups; the total stays G x layers and every layer keeps at least one.

How the other experts join is a grouping method, registered by name in GROUPINGS. Beyond
M-SMoE: "hc" (HC-SMoE) clusters experts by what they compute, the cosine of their mean outputs
on the calibration tokens, with average-linkage hierarchical clustering, each cluster led by its
most used member; "reap" (REAP) keeps the G experts of highest saliency (mean routing weight x
output norm over the tokens routed to them) and removes the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from ..errors import ParameterError
from .registry import Registry
from .stats import LayerRoutingStats


@dataclass
class LayerGrouping:
    """How one layer's E experts fold into G groups.

    expert_to_group[e]: the group of expert e (-1: removed).
    dominant_experts[g]: the expert that leads group g (its weights are the alignment reference).
    """

    expert_to_group: list[int]
    dominant_experts: list[int]

    @property
    def num_groups(self) -> int:
        return len(self.dominant_experts)

    def members(self, group: int) -> list[int]:
        """Experts of `group`, the dominant one first."""
        lead = self.dominant_experts[group]
        return [lead] + [e for e, g in enumerate(self.expert_to_group) if g == group and e != lead]


def dominant_experts(frequency: torch.Tensor, num_groups: int) -> list[int]:
    """The `num_groups` most used experts, ascending by index; ties go to the lower index."""
    order = sorted(range(len(frequency)), key=lambda e: (-float(frequency[e]), e))
    return sorted(order[:num_groups])


def _group(frequency: torch.Tensor, num_groups: int, join: Callable[[int, list[int]], int]) -> LayerGrouping:
    """Dominant experts lead groups; `join(expert, leads)` picks the group of every other expert."""
    leads = dominant_experts(frequency, num_groups)
    expert_to_group = [leads.index(e) if e in leads else join(e, leads) for e in range(len(frequency))]
    return LayerGrouping(expert_to_group=expert_to_group, dominant_experts=leads)


def group_by_similarity(frequency: torch.Tensor, similarity: torch.Tensor, num_groups: int) -> LayerGrouping:
    """M-SMoE: dominant experts by frequency; each other expert joins its most similar dominant expert."""
    return _group(frequency, num_groups, lambda e, leads: int(torch.argmax(similarity[e, leads])))


def group_randomly(frequency: torch.Tensor, num_groups: int, generator: torch.Generator) -> LayerGrouping:
    """Baseline: dominant experts by frequency, the others join groups at random."""
    return _group(frequency, num_groups, lambda e, leads: int(torch.randint(len(leads), (1,), generator=generator)))


def drop_least_used(frequency: torch.Tensor, num_groups: int) -> LayerGrouping:
    """Baseline: keep the most used experts as they are and remove the others (group -1)."""
    return _group(frequency, num_groups, lambda e, leads: -1)


def cluster_by_outputs(mean_output: torch.Tensor, frequency: torch.Tensor, num_groups: int) -> LayerGrouping:
    """HC-SMoE: experts clustered by the cosine of their mean outputs [E, H], average linkage, into
    `num_groups` clusters; each cluster's most used expert (frequency [E]; ties: lower index) leads it.
    Groups are numbered by their dominant expert, ascending."""
    num_experts = len(frequency)
    if num_groups == num_experts:
        return LayerGrouping(list(range(num_experts)), list(range(num_experts)))
    if num_groups == 1:
        labels = np.ones(num_experts, dtype=int)
    else:
        unit = mean_output.double() / mean_output.double().norm(dim=-1, keepdim=True).clamp(min=1e-30)
        distance = (1.0 - unit @ unit.T).clamp(min=0.0).numpy()
        np.fill_diagonal(distance, 0.0)
        distance = (distance + distance.T) / 2  # exactly symmetric, as squareform requires
        # cutting the tree (not a distance threshold) gives exactly num_groups clusters even when
        # experts are identical (zero distances tie); average linkage is monotonic, as cut_tree needs
        tree = linkage(squareform(distance, checks=False), method="average")
        labels = cut_tree(tree, n_clusters=num_groups)[:, 0]
    clusters = [[e for e in range(num_experts) if labels[e] == label] for label in sorted(set(labels.tolist()))]
    leads = [min(members, key=lambda e: (-float(frequency[e]), e)) for members in clusters]
    order = sorted(range(num_groups), key=lambda g: leads[g])
    expert_to_group = [0] * num_experts
    for group, cluster in enumerate(order):
        for e in clusters[cluster]:
            expert_to_group[e] = group
    return LayerGrouping(expert_to_group, [leads[c] for c in order])


def prune_by_saliency(saliency: torch.Tensor, num_groups: int) -> LayerGrouping:
    """REAP: keep the `num_groups` experts of highest saliency [E] (ties: lower index) as they are and
    remove the others (group -1)."""
    return _group(saliency, num_groups, lambda e, leads: -1)


@dataclass
class GroupingContext:
    """What a grouping method may use beyond the layer's statistics.

    similarity: name in stats.SIMILARITIES of the expert similarity to group by.
    generator: random source shared by all layers in order (so random groupings are reproducible).
    """

    similarity: str
    generator: torch.Generator


# grouping name -> method(layer statistics, number of groups, context) -> the layer's grouping
GroupingMethod = Callable[[LayerRoutingStats, int, GroupingContext], LayerGrouping]
GROUPINGS: Registry[GroupingMethod] = Registry("grouping")
register_grouping = GROUPINGS.register


@register_grouping("similarity")
def _similarity(layer: LayerRoutingStats, num_groups: int, context: GroupingContext) -> LayerGrouping:
    return group_by_similarity(layer.frequency, layer.similarity(context.similarity), num_groups)


@register_grouping("random")
def _random(layer: LayerRoutingStats, num_groups: int, context: GroupingContext) -> LayerGrouping:
    return group_randomly(layer.frequency, num_groups, context.generator)


@register_grouping("drop")
def _drop(layer: LayerRoutingStats, num_groups: int, context: GroupingContext) -> LayerGrouping:
    return drop_least_used(layer.frequency, num_groups)


@register_grouping("hc")
def _hc(layer: LayerRoutingStats, num_groups: int, context: GroupingContext) -> LayerGrouping:
    return cluster_by_outputs(layer.mean_output, layer.frequency, num_groups)


@register_grouping("reap")
def _reap(layer: LayerRoutingStats, num_groups: int, context: GroupingContext) -> LayerGrouping:
    return prune_by_saliency(layer.saliency, num_groups)


# groupings that read expert outputs, which the statistics pass collects only when asked
NEEDS_EXPERT_OUTPUTS = frozenset({"hc", "reap"})


def groups_per_layer(frequencies: list[torch.Tensor], num_groups: int, adaptive: bool) -> list[int]:
    """Number of groups of each layer: `num_groups` everywhere, or adaptive with the same total.

    Adaptive: every layer first keeps its most used expert, then the remaining
    budget goes to the most used (layer, expert) pairs over all layers, which is
    one global frequency threshold.
    """
    num_experts = len(frequencies[0])
    if not 1 <= num_groups <= num_experts:
        raise ParameterError(
            "num_groups", f"must be between 1 and the {num_experts} experts per layer, not {num_groups}"
        )
    if not adaptive:
        return [num_groups] * len(frequencies)
    counts = [1] * len(frequencies)
    candidates = []
    for layer, frequency in enumerate(frequencies):
        ranked = sorted(frequency.tolist(), reverse=True)
        candidates += [(value, layer, rank) for rank, value in enumerate(ranked) if rank > 0]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    for _value, layer, _rank in candidates[: num_groups * len(frequencies) - len(frequencies)]:
        counts[layer] += 1
    return counts
