"""`mcsmoe compress` as a function: checkpoint directory in, compressed checkpoint directory out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..files import prepare_output_dir
from ..models import FamilyAdapter
from ..report import SizeReport, size_report
from .distill import DistillReport
from .plan import AppliedPlan, CompressionPlan, apply_plan, plan_compression
from .recipe import CompressionRecipe
from .calibrated import CalibratedModel, holds_stored_dtype
from .standard import check_standard
from .stats import collect_routing_stats


@dataclass
class CompressionResult:
    """What a compression run produced and measured: the plan, what was built from it, sizes
    before and after, seconds, and the distillation if any."""

    out_dir: Path | None
    plan: CompressionPlan
    applied: AppliedPlan
    before: SizeReport
    after: SizeReport
    seconds: float
    distill: DistillReport | None = None
    router_calibration: DistillReport | None = None


def compress_loaded(
    model: nn.Module,
    adapter: FamilyAdapter,
    blocks: torch.Tensor,
    recipe: CompressionRecipe,
    progress: bool = True,
) -> AppliedPlan:
    """Routing statistics on `blocks` [N, S], a plan, and the plan applied to `model` in place."""
    stats = collect_routing_stats(model, adapter, blocks, progress=progress, keep_inputs=recipe.calibration_inputs,
                                  expert_outputs=recipe.needs_expert_outputs)
    plan = plan_compression(stats, adapter.num_experts(model.config), recipe, adapter.family)
    return apply_plan(model, adapter, plan, recipe, progress=progress)


def compress_model(
    model_dir: str | Path,
    out_dir: str | Path | None,
    recipe: CompressionRecipe | None = None,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> CompressionResult:
    """Compress the MoE checkpoint in `model_dir` into `out_dir` (None: compress in memory only).

    device: None picks the GPU when there is one; "auto" spreads the model over
    devices with accelerate. Everything the user can get wrong (paths, options,
    model type, weights) is checked before the long work starts.
    """
    recipe = recipe or CompressionRecipe()
    recipe.validate()
    if out_dir is not None:
        prepare_output_dir(out_dir, force, inputs=(model_dir,))
    start = time.perf_counter()
    # a merge or low-rank recipe holds the model in its stored dtype (half the memory for bf16), same result
    source = CalibratedModel(model_dir, recipe, device=device, progress=progress,
                             hold_stored_dtype=holds_stored_dtype(recipe))
    before = size_report(source.model, source.adapter, source.stored_dtype)
    compressed = source.compress(recipe, in_place=True)
    if recipe.output_format == "standard":  # refused now, in one line, before any training
        check_standard(source.adapter, compressed.applied)
    if recipe.distill_steps:
        source.distill(compressed)
    if recipe.output_format == "standard":
        source.to_standard(compressed)
    if recipe.calibrate_router:
        source.calibrate_router(compressed)
    source.quantize(compressed)
    source.to_stored_dtype(compressed)
    after = size_report(compressed.model, source.adapter)
    if out_dir is not None:
        out_dir = source.save(compressed, out_dir, force=force)
    seconds = time.perf_counter() - start
    return CompressionResult(out_dir, compressed.plan, compressed.applied, before, after, seconds, compressed.distill,
                             compressed.router_calibration)
