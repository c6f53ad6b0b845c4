"""`mcsmoe compress` as a function: checkpoint directory in, compressed checkpoint directory out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save_compressed
from ..files import prepare_output_dir
from ..corpus import calibration_text, load_tokenizer_from, token_blocks
from ..errors import UserError
from ..models import FamilyAdapter, adapter_for_config, load_model, read_config_dict
from ..report import SizeReport, size_report
from .distill import DistillReport, distill
from .plan import CompressionPlan, apply_plan, plan_compression
from .recipe import CompressionRecipe
from .stats import collect_routing_stats


@dataclass
class CompressionResult:
    """What a compression run produced and measured."""

    out_dir: Path | None
    plan: CompressionPlan
    before: SizeReport
    after: SizeReport
    seconds: float
    distill: DistillReport | None = None


def load_tokenizer(model_dir: str | Path):
    """The model directory's tokenizer; UserError if it has none (calibration needs one)."""
    return load_tokenizer_from(model_dir, "calibration needs one")


def check_experts(model_dir: str | Path, recipe: CompressionRecipe) -> None:
    """UserError if the model is not a supported MoE or has fewer experts than the recipe asks for."""
    from transformers import AutoConfig

    adapter = adapter_for_config(read_config_dict(model_dir))
    num_experts = adapter.num_experts(AutoConfig.from_pretrained(model_dir))
    if recipe.experts is not None and recipe.experts > num_experts:
        raise UserError(f"--experts {recipe.experts} is more than the model's {num_experts} experts per layer")


def calibration_blocks(tokenizer, recipe: CompressionRecipe) -> torch.Tensor:
    """Calibration token blocks [N, calib_seq_len] from the recipe's text source."""
    return token_blocks(tokenizer, calibration_text(recipe.calib), recipe.calib_seq_len, recipe.max_calib_tokens)


def mcsmoe_section(plan: CompressionPlan, recipe: CompressionRecipe, source: str, distilled: DistillReport | None) -> dict:
    """The "mcsmoe" section of a compressed checkpoint's config.json."""
    return {
        "family": plan.family,
        "source_model": source,
        "recipe": recipe.to_dict(),
        "calibration": {"source": recipe.calib or "builtin", "tokens": plan.calibration_tokens},
        "distillation": None if distilled is None else vars(distilled),
        "layers": {layer.name: layer.to_dict() for layer in plan.layers},
    }


def compress_loaded(
    model: nn.Module,
    adapter: FamilyAdapter,
    blocks: torch.Tensor,
    recipe: CompressionRecipe,
    progress: bool = True,
) -> CompressionPlan:
    """Routing statistics on `blocks`, a plan, and the plan applied to `model` in place."""
    keep = recipe.activation_samples if recipe.activation_aware else 0
    stats = collect_routing_stats(model, adapter, blocks, progress=progress, keep_inputs=keep)
    plan = plan_compression(stats, adapter.num_experts(model.config), recipe, adapter.family)
    apply_plan(model, adapter, plan, recipe, progress=progress)
    return plan


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
        prepare_output_dir(out_dir, force)
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    check_experts(model_dir, recipe)
    blocks = calibration_blocks(load_tokenizer(model_dir), recipe)
    model, adapter = load_model(model_dir, device=device)
    before = size_report(model, adapter)
    plan = compress_loaded(model, adapter, blocks, recipe, progress)
    distilled = None
    if recipe.distill_steps:
        teacher, _ = load_model(model_dir, device=device)
        distilled = distill(
            model, teacher, adapter, blocks, recipe.distill_steps, lr=recipe.distill_learning_rate, seed=recipe.seed,
            progress=progress,
        )
        del teacher
    after = size_report(model, adapter)
    section = mcsmoe_section(plan, recipe, str(model_dir), distilled)
    if out_dir is not None:
        out_dir = save_compressed(model, section, out_dir, source_dir=model_dir, force=force)
    return CompressionResult(out_dir, plan, before, after, time.perf_counter() - start, distilled)
