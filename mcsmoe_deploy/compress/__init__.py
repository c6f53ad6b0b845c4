"""Merge, then compress: routing statistics, grouping, alignment, merging, low-rank + sparse, distillation."""

from .activation_aware import projection_input_moments, second_moment
from .distill import DistillReport, distill, distillation_loss, train_compressed_experts
from .grouping import LayerGrouping, drop_least_used, group_by_similarity, group_randomly, groups_per_layer
from .lowrank import LowRankSparse, low_rank_sparse, rank_for_energy, rank_for_ratio, sparse_row_count
from .merge import merge_experts, merge_layer
from .permute import align_to, alignment_permutation, permute_expert
from .pipeline import CompressionResult, calibration_blocks, compress_loaded, compress_model, load_tokenizer
from .plan import CompressionPlan, LayerPlan, apply_plan, build_grouped_experts, plan_compression
from .recipe import CompressionRecipe
from .stats import LayerRoutingStats, RoutingStats, collect_routing_stats

__all__ = [
    "CompressionPlan",
    "CompressionRecipe",
    "CompressionResult",
    "DistillReport",
    "LayerGrouping",
    "LayerPlan",
    "LayerRoutingStats",
    "LowRankSparse",
    "RoutingStats",
    "align_to",
    "alignment_permutation",
    "apply_plan",
    "build_grouped_experts",
    "calibration_blocks",
    "collect_routing_stats",
    "compress_loaded",
    "compress_model",
    "distill",
    "distillation_loss",
    "drop_least_used",
    "group_by_similarity",
    "group_randomly",
    "groups_per_layer",
    "load_tokenizer",
    "low_rank_sparse",
    "merge_experts",
    "merge_layer",
    "permute_expert",
    "plan_compression",
    "projection_input_moments",
    "rank_for_energy",
    "rank_for_ratio",
    "second_moment",
    "sparse_row_count",
    "train_compressed_experts",
]
