"""A dense checkpoint loaded once, with its calibration text and one routing-statistics pass that
every recipe compressed from it shares.

`compress_model` is one recipe made from a CalibratedModel (compressed in place, distilled, saved);
the demo makes three (merged; merged and quantized; merged and compressed) from the same pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import cast_to_stored_dtype, save_compressed, save_standard
from ..corpus import calibration_text, load_tokenizer_from, token_blocks
from ..errors import UserError
from ..models import (
    adapter_for_config,
    check_config_values,
    check_device,
    load_model,
    read_config_dict,
    stored_dtype,
)
from .distill import DistillReport, distill
from .output_refit import check_refit_size
from .plan import AppliedPlan, CompressionPlan, apply_plan, plan_compression
from .gptq import ExpertInputMoments
from .gptq_linears import LinearInputMoments
from .quantize import applied_with_quantized_experts, check_quantizable, quantize_model
from .recipe import CompressionRecipe
from .router_calibration import calibrate_routers
from .standard import check_standard, to_standard_model
from .stats import RoutingStats, collect_routing_stats

# recipe fields that decide the calibration blocks: recipes sharing one statistics pass must agree on them
CALIBRATION_FIELDS = ("calib", "max_calib_tokens", "calib_seq_len", "activation_samples")


def load_tokenizer(model_dir: str | Path):
    """The model directory's tokenizer; UserError if it has none (calibration needs one)."""
    return load_tokenizer_from(model_dir, "calibration needs one")


def check_experts(model_dir: str | Path, recipe: CompressionRecipe) -> None:
    """UserError if the model is not a supported MoE or has fewer experts than the recipe asks for."""
    from transformers import AutoConfig

    config_dict = read_config_dict(model_dir)
    adapter = adapter_for_config(config_dict)
    check_config_values(adapter, config_dict, Path(model_dir) / "config.json")
    config = AutoConfig.from_pretrained(model_dir)
    recipe.check_model(adapter.num_experts(config))
    if recipe.output_format == "standard" and (adapter.num_experts_key is None or adapter.encoder_decoder):
        raise UserError(f"--format standard is not available for the {adapter.family} family; use our format")
    recipe.check_layout(adapter.expert_layout(config))
    if recipe.output_refit:
        check_refit_size(recipe.groups(adapter.num_experts(config)), adapter.expert_layout(config).intermediate_size)


def calibration_blocks(tokenizer, recipe: CompressionRecipe) -> torch.Tensor:
    """Calibration token blocks [N, calib_seq_len] from the recipe's text source."""
    return token_blocks(tokenizer, calibration_text(recipe.calib), recipe.calib_seq_len, recipe.max_calib_tokens)


def mcsmoe_section(
    applied: AppliedPlan, recipe: CompressionRecipe, source: str, distilled: DistillReport | None
) -> dict:
    """The "mcsmoe" section of a compressed checkpoint's config.json."""
    return {
        "family": applied.family,
        "source_model": source,
        "recipe": recipe.to_dict(),
        "calibration": {"source": recipe.calib or "builtin", "tokens": applied.calibration_tokens},
        "distillation": None if distilled is None else vars(distilled),
        "layers": {layer.name: layer.to_dict() for layer in applied.layers},
    }


def check_finite(model: nn.Module, stage: str) -> None:
    """UserError naming the first tensor with a NaN or infinite value after `stage`: nothing is saved then."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{stage} left non-finite values in {name}; nothing was written")


def holds_stored_dtype(recipe: CompressionRecipe) -> bool:
    """Whether `recipe` can run on a model held in its stored dtype (CalibratedModel's hold_stored_dtype): it
    only merges and compresses. Distillation and router calibration train in fp32, quantization and the
    standard format start from the fp32 merged weights."""
    return not (recipe.distill_steps or recipe.calibrate_router or recipe.quantize is not None
                or recipe.output_format == "standard")


@dataclass
class CompressedModel:
    """A compressed model in memory: the recipe it was made with, the plan, what was built, its
    distillation and router calibration once done; `standard` once `model` is a plain model of the
    source family (see compress/standard.py)."""

    model: nn.Module
    recipe: CompressionRecipe
    plan: CompressionPlan
    applied: AppliedPlan
    distill: DistillReport | None = None
    router_calibration: DistillReport | None = None
    standard: bool = False


class CalibratedModel:
    """A dense MoE checkpoint, its calibration blocks [N, calib_seq_len] and, on first use, one
    routing-statistics pass shared by every recipe compressed from it.

    Everything a user can get wrong (recipe, model type, expert count, tokenizer, calibration text,
    weights) is checked here, before the long work. device: as in `load_model`.

    hold_stored_dtype: keep the weights in the checkpoint's own dtype (bf16 in memory for a bf16 source, half
    the bytes of fp32) and compute in fp32 a layer at a time: the statistics pass through
    models.fp32_compute, merging and low rank on fp32 copies of one layer's experts. The result is the fp32
    path's, bit for bit. Only for recipes that `holds_stored_dtype` allows (no training, no quantization, our
    format); a later recipe that needs more gets an fp32 copy of the model.
    """

    def __init__(
        self, model_dir: str | Path, recipe: CompressionRecipe, device: str | None = None, progress: bool = True,
        hold_stored_dtype: bool = False,
    ):
        recipe.validate()
        torch.manual_seed(recipe.seed)
        check_experts(model_dir, recipe)
        if device is not None:
            check_device(device)
        self.model_dir = Path(model_dir)
        self.recipe = recipe
        self.device = device
        self.progress = progress
        self.tokenizer = load_tokenizer(model_dir)
        self.blocks = calibration_blocks(self.tokenizer, recipe)
        self.stored_dtype = stored_dtype(model_dir)
        if hold_stored_dtype and not holds_stored_dtype(recipe):
            raise ValueError("this recipe trains or quantizes the model: it needs the model in fp32")
        # fp32, whatever the source's dtype, unless held in the stored dtype
        self.held_dtype = self.stored_dtype if hold_stored_dtype else torch.float32
        self.model, self.adapter = load_model(model_dir, device=device, dtype=self.held_dtype)
        vocab = self.model.config.vocab_size
        if int(self.blocks.max()) >= vocab:
            raise UserError(f"the tokenizer in {model_dir} does not match the model: token id {int(self.blocks.max())} "
                            f"is beyond its vocabulary of {vocab}")
        if recipe.quant_spec is not None and recipe.quant_scope != "experts":  # before the long work
            check_quantizable(self.model, self.adapter, recipe.quant_spec, recipe.quant_scope)
        self._stats: RoutingStats | None = None
        self._dense = True  # False once a recipe compressed `model` in place

    @property
    def stats(self) -> RoutingStats:
        """Routing statistics of the dense model on the calibration blocks (one pass, then kept)."""
        if self._stats is None:
            self._stats = collect_routing_stats(
                self.model, self.adapter, self.blocks, progress=self.progress,
                keep_inputs=self.recipe.calibration_inputs, expert_outputs=self.recipe.needs_expert_outputs,
            )
        return self._stats

    def compress(self, recipe: CompressionRecipe | None = None, in_place: bool = False) -> CompressedModel:
        """`recipe` (default: the one calibrated with) applied to a copy of the dense model, or to the
        model itself with `in_place` (no copy; no further recipe can follow)."""
        recipe = recipe or self.recipe
        recipe.validate()
        differ = [name for name in CALIBRATION_FIELDS if getattr(recipe, name) != getattr(self.recipe, name)]
        if recipe.needs_expert_outputs and not self.recipe.needs_expert_outputs:
            differ.append("expert outputs")
        if differ or recipe.calibration_inputs > self.recipe.calibration_inputs:
            raise ValueError(f"the recipe calibrates differently from the statistics pass ({', '.join(differ)})")
        if not self._dense:
            raise ValueError("the dense model was compressed in place; no further recipe can be applied")
        stats = self.stats
        model = self.model if in_place else copy.deepcopy(self.model)
        if self.held_dtype != torch.float32 and not holds_stored_dtype(recipe):
            model = model.float()  # exactly the fp32-loaded model: bf16 and fp16 values are exact in fp32
        self._dense = not in_place
        plan = plan_compression(stats, self.adapter.num_experts(model.config), recipe, self.adapter.family)
        applied = apply_plan(model, self.adapter, plan, recipe, progress=self.progress)
        check_finite(model, "merging and low rank")
        return CompressedModel(model, recipe, plan, applied)

    def distill(self, compressed: CompressedModel) -> DistillReport:
        """Recover `compressed` by its recipe's distillation from the dense model (reloaded if it was
        compressed in place); the report is also kept in `compressed.distill`."""
        recipe = compressed.recipe
        compressed.distill = distill(
            compressed.model, self._teacher(), self.adapter, self.blocks, recipe.distill_steps, lr=recipe.distill_learning_rate,
            seed=recipe.seed, progress=self.progress,
        )
        check_finite(compressed.model, f"distillation at peak rate {recipe.distill_learning_rate:g}")
        return compressed.distill

    def _teacher(self) -> nn.Module:
        """The dense model in fp32 (reloaded if it was compressed in place or is held in another dtype)."""
        if self._dense and self.held_dtype == torch.float32:
            return self.model
        return load_model(self.model_dir, device=self.device)[0]

    def to_standard(self, compressed: CompressedModel) -> None:
        """Replace `compressed.model` by a plain model of the source family with G experts per layer
        (compress/standard.py); UserError in one line if the recipe built what a standard config cannot hold."""
        compressed.model = to_standard_model(compressed.model, self.adapter, compressed.applied)
        compressed.standard = True

    def calibrate_router(self, compressed: CompressedModel) -> DistillReport:
        """Train `compressed`'s routers alone to match the dense model on the calibration text, by its
        recipe's router_steps and router_lr; the report is also kept in `compressed.router_calibration`."""
        recipe = compressed.recipe
        compressed.router_calibration = calibrate_routers(
            compressed.model, self._teacher(), self.adapter, self.blocks, recipe.router_steps, recipe.router_lr,
            seed=recipe.seed, progress=self.progress,
        )
        check_finite(compressed.model, f"router calibration at peak rate {recipe.router_lr:g}")
        return compressed.router_calibration

    def quantize(self, compressed: CompressedModel) -> None:
        """Quantize `compressed` by its recipe (see compress/quantize.py), in place: its experts, by the
        recipe's method (its `applied` plan then records the quantization of every projection) and, with
        quant_scope "all" (or "all+embeddings"), its other linear layers (and input embeddings), by the same method (the checkpoint records them)."""
        recipe = compressed.recipe
        quant = recipe.quant_spec
        if quant is None:
            return
        moments = linear_moments = None
        if recipe.quant_method == "gptq":  # fitted to the calibration blocks, layer by layer
            moments = ExpertInputMoments(compressed.model, self.adapter, self.blocks, progress=self.progress,
                                         max_tokens=recipe.activation_samples)
            linear_moments = LinearInputMoments(compressed.model, self.adapter, self.blocks, progress=self.progress,
                                                max_tokens=recipe.activation_samples)
        quantize_model(compressed.model, self.adapter, quant, recipe.quant_scope, input_moments=moments,
                       linear_moments=linear_moments)
        compressed.applied = applied_with_quantized_experts(compressed.model, compressed.applied)

    def to_stored_dtype(self, compressed: CompressedModel) -> None:
        """Cast `compressed` to the source checkpoint's dtype (bf16 in, bf16 out), in place: the last stage."""
        cast_to_stored_dtype(compressed.model, self.stored_dtype)

    def save(self, compressed: CompressedModel, out_dir: str | Path, force: bool = False) -> Path:
        """Write `compressed` as a checkpoint directory (checkpoint.save_compressed, or save_standard once
        it is a standard model); returns its path."""
        if compressed.standard:
            return save_standard(compressed.model, out_dir, source_dir=self.model_dir, force=force)
        section = mcsmoe_section(compressed.applied, compressed.recipe, str(self.model_dir), compressed.distill)
        return save_compressed(compressed.model, section, out_dir, source_dir=self.model_dir, force=force)
