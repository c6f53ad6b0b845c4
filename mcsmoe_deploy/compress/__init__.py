"""Merge, then compress: routing statistics, grouping, alignment, merging, low-rank + sparse, distillation,
quantization.

The strategies a recipe names live in registries (GROUPINGS, WEIGHTINGS, SIMILARITIES,
LOW_RANK_KINDS); `register_grouping` and its siblings add a method without editing the pipeline.
"""

from .activation_aware import projection_input_moments, second_moment
from .distill import DistillReport, distill, distillation_loss, train_compressed_experts, train_parameters
from .grouping import (
    GROUPINGS,
    NEEDS_EXPERT_OUTPUTS,
    GroupingContext,
    LayerGrouping,
    cluster_by_outputs,
    drop_least_used,
    prune_by_saliency,
    group_by_similarity,
    group_randomly,
    groups_per_layer,
    register_grouping,
)
from .lowrank import (
    LOW_RANK_KINDS,
    LowRankKind,
    LowRankSparse,
    low_rank_sparse,
    rank_for_energy,
    rank_for_ratio,
    register_low_rank,
    sparse_row_count,
)
from .merge import WEIGHTINGS, merge_experts, merge_layer, register_weighting
from .output_refit import (check_refit_size, compressed_group_weights, dense_block_output, expert_hidden,
                           refit_output_projections)
from .permute import align_to, alignment_permutation, permute_expert
from .pipeline import CompressionResult, compress_loaded, compress_model
from .plan import (
    AppliedLayer,
    AppliedPlan,
    CompressionPlan,
    LayerPlan,
    apply_plan,
    build_grouped_experts,
    plan_compression,
    quantizable_rank,
)
from .gptq import ExpertInputMoments, gptq_projection, gptq_quantize, gptq_quantize_batch
from .gptq_linears import LinearInputMoments, gptq_weight_for
from .quantize import (InputMoments, LinearMoments, check_quantizable, linears_to_quantize, quantize_experts, quantize_model,
                       tied_output_embeddings)
from .recipe import FORMATS, QUANT_METHODS, QUANT_SCOPES, QUANTIZATIONS, CompressionRecipe
from .base_delta import BaseDelta, base_delta, base_delta_rank_for_ratio, frequency_weighted_mean
from .shared_basis import LOW_RANK_BASES, SharedBasis, shared_basis, shared_rank_for_ratio, shared_side
from .router_calibration import calibrate_routers, kl_to_teacher, router_parameters
from .standard import check_standard, to_standard_model
from .registry import Registry
from .calibrated import CalibratedModel, CompressedModel, calibration_blocks, load_tokenizer
from .stats import (
    SIMILARITIES,
    LayerRoutingStats,
    RoutingStats,
    accumulate_expert_outputs,
    collect_routing_stats,
    register_similarity,
    routing_weights,
)

__all__ = [
    "BaseDelta",
    "base_delta",
    "base_delta_rank_for_ratio",
    "frequency_weighted_mean",
    "check_refit_size",
    "compressed_group_weights",
    "dense_block_output",
    "expert_hidden",
    "refit_output_projections",
    "LOW_RANK_BASES",
    "SharedBasis",
    "shared_basis",
    "shared_rank_for_ratio",
    "shared_side",
    "QUANT_METHODS",
    "FORMATS",
    "NEEDS_EXPERT_OUTPUTS",
    "accumulate_expert_outputs",
    "calibrate_routers",
    "check_standard",
    "cluster_by_outputs",
    "kl_to_teacher",
    "prune_by_saliency",
    "router_parameters",
    "routing_weights",
    "to_standard_model",
    "train_parameters",
    "QUANTIZATIONS",
    "QUANT_SCOPES",
    "check_quantizable",
    "linears_to_quantize",
    "ExpertInputMoments",
    "LinearInputMoments",
    "LinearMoments",
    "gptq_weight_for",
    "InputMoments",
    "gptq_projection",
    "gptq_quantize",
    "gptq_quantize_batch",
    "quantizable_rank",
    "quantize_experts",
    "quantize_model",
    "tied_output_embeddings",
    "GROUPINGS",
    "LOW_RANK_KINDS",
    "SIMILARITIES",
    "WEIGHTINGS",
    "AppliedLayer",
    "AppliedPlan",
    "CalibratedModel",
    "CompressedModel",
    "GroupingContext",
    "LowRankKind",
    "Registry",
    "register_grouping",
    "register_low_rank",
    "register_similarity",
    "register_weighting",
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
