"""The recipe: every choice that turns a dense MoE checkpoint into a compressed one."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ParameterError
from ..models.base import ExpertLayout
from ..quantization import DEFAULT_BLOCK, QuantSpec
from .grouping import GROUPINGS, NEEDS_EXPERT_OUTPUTS
from .lowrank import LOW_RANK_KINDS, check_rank_energy, check_rank_ratio, check_sparse_keep
from .merge import WEIGHTINGS
from .shared_basis import LOW_RANK_BASES
from .stats import SIMILARITIES

# Default peak learning rates of distillation (linear decay to 0), measured on the embedded model
# (merged 8 -> 4 experts, held-out perplexity 20.64): 1e-3 undoes a good merge (21.97 after 200
# steps, 3e-4 gives 20.52), while a lossy low-rank model recovers more with it (rank ratio 0.55,
# 400 steps: 26.4 at 1e-3, 29.0 at 3e-4).
MERGED_DISTILL_LR = 3e-4
QUANTIZATIONS = {"int4": 4, "int8": 8}
# what `quantize` covers: every linear layer but the routers (decoder-only families), the same and the input
# embeddings, or the experts only
QUANT_SCOPES = ("all", "all+embeddings", "experts")
EMBEDDINGS_SCOPE = "all+embeddings"
# how codes are chosen (the stored format is the same): round to nearest, or GPTQ's error feedback
# fitted to the calibration inputs (compress/gptq.py)
QUANT_METHODS = ("rtn", "gptq")
COMPRESSED_DISTILL_LR = 1e-3
# base-delta low rank starts close to the dense model, so recovery must only nudge it: on the embedded LM
# (8 experts, rank ratio 0.3, whitened: 21.10 before recovery), 100 steps gave 22.25 at 1e-3, 21.19 at 3e-4,
# 20.93 at 1e-4 and 20.96 at 3e-5 (benchmarks/results/quality-shared-basis.md)
BASE_DELTA_DISTILL_LR = 1e-4
# router calibration defaults. Measured on the embedded model (G = 4, 25 steps of 8 blocks): a standard-format
# M-SMoE model (dominant experts' router rows) went from 21.61 to 21.34 held-out perplexity at 1e-3 (21.47 at
# 3e-4); in our format, whose E-row router already reproduces the dense routing, it did not help (M-SMoE 20.64 ->
# 20.77, hc 21.20 -> 21.20, reap 22.13 -> 22.13; 3e-3 was worse still)
ROUTER_STEPS = 200
ROUTER_LR = 1e-3
# output formats: "mcsmoe" (our checkpoint: E-row router, expert -> group map, the GroupedLowRankMoE op)
# or "standard" (the source family's own checkpoint with G experts and a G-row router)
FORMATS = ("mcsmoe", "standard")


@dataclass
class CompressionRecipe:
    """What `mcsmoe compress` does; the defaults are M-SMoE followed by MC-SMoE compression.

    experts: groups (merged experts) per layer; None means half the model's experts.
    adaptive: spread the same total of groups over layers by one global frequency threshold.
    The named strategies are looked up in their registries, which list every choice:
    similarity: stats.SIMILARITIES, "router-logits" (cosine of logit columns on calibration text) or
        "router-weights".
    grouping: grouping.GROUPINGS, "similarity" (M-SMoE), "hc" (HC-SMoE: average-linkage clustering of
        the experts' mean outputs), "reap" (REAP: keep the G experts of highest routing weight x output
        norm, remove the rest), or the baselines "random" and "drop" (keep the most used, remove the rest).
        Removed experts also lose their router rows.
    weighting: merge.WEIGHTINGS, "frequency" (M-SMoE) or "uniform" averaging inside a group.
    permute: align each member's neurons to its dominant expert before merging.
    rank_ratio: share of a dense projection's parameters kept by its low-rank factors; 1 = merge only.
    rank_energy: if set, pick each layer's rank to keep this share of squared singular values instead.
    sparse_keep: share of rows of the low-rank residual kept as structured-sparse rows.
    low_rank: lowrank.LOW_RANK_KINDS, how factors are fitted: "svd" (the paper, weight error) or
        "activation-aware" (fit to calibration activations, minimising the output error; not in the
        paper), from the first `activation_samples` calibration tokens of each layer (GPTQ fits to the
        same number of tokens).
    low_rank_basis: LOW_RANK_BASES, "per-expert" (the paper: each merged expert's own factors) or
        "shared": per layer and projection one basis on the hidden-size side for all merged experts
        plus each expert's coefficients (D2-MoE / Sub-MoE style; whitened with "activation-aware"),
        at the rank that stores as many numbers as per-expert factors at `rank_ratio` (equal bytes;
        compress/shared_basis.py); or "base-delta": per layer and projection one full-rank base (the
        merged experts' frequency-weighted mean) plus each expert's low-rank delta from it (D2-MoE style;
        whitened with "activation-aware"), at equal bytes too (needs rank_ratio > 1/G: the base costs
        one dense projection; compress/base_delta.py). Neither with `rank_energy` or `quantize`.
    output_refit: after merging (or pruning), refit each layer's merged or kept experts' output
        projections (down / wo) by ridge-regularised least squares so that the compressed block
        reproduces the dense block's output on the first `refit_tokens` calibration tokens,
        routed as the compressed model routes them (compress/output_refit.py; not in the paper).
        Routers and input projections stay; only weight values change. Needs no training. With
        output_format "standard", merged groups are fitted to our format's routing, which the standard
        router (dominant rows) does not reproduce; pruned ones route the same in both.
    refit_ridge: the refit's ridge, relative to the mean diagonal of its Gram matrix; it pulls
        towards the merged weights, so one expert per group is left exactly as it was.
    refit_tokens: calibration tokens per layer the refit fits to (their block inputs [n, H] are held
        during compression). On the embedded LM at G = 4, calibration seed 0, M-SMoE + refit (ridge
        1e-2): held-out perplexity 20.46 with 4096 tokens, 20.26 with 32768 (dense 18.90, merged 20.48).
    calib: calibration text file (.txt or .jsonl) or None for the built-in corpus.
    max_calib_tokens, calib_seq_len: calibration budget in tokens and block length.
    distill_steps: knowledge-distillation steps from the original model (0: none).
    distill_lr: their peak learning rate, decaying linearly to 0; None: MERGED_DISTILL_LR for a
        merge-only recipe, BASE_DELTA_DISTILL_LR with base-delta low rank, COMPRESSED_DISTILL_LR with
        other low rank (see `distill_learning_rate`).
    quantize: None, "int4" or "int8": after merging, low rank and distillation, every merged expert's
        factors (dense weights, or the low-rank left and right) are quantized blockwise, round to
        nearest (quantization.py); low-rank ranks are rounded to a multiple of `quant_block`.
    quant_block: values per quantization block along a factor's input dimension (a power of two >= 16).
    quant_symmetric: symmetric codes (no zero points) or asymmetric (a zero point per block; the
        default: on the embedded LM, int4 blocks of 16, every layer, round to nearest, held-out
        perplexity 19.85 symmetric against 19.31 asymmetric, dense fp32 18.90; 4 more bits per block).
    quant_scope: what `quantize` covers: "all" (default) also quantizes every other linear layer of a
        decoder-only model (attention q/k/v/o, a shared expert and its gate, the LM head; routers and
        embeddings stay float, biases too); "all+embeddings" the same and the input embedding table
        (one table with the LM head when they were tied); "experts" only the merged experts. Switch
        Transformers quantizes its experts only (and refuses "all+embeddings").
    quant_method: QUANT_METHODS, "rtn" (round to nearest) or "gptq" (error feedback fitted to the
        first `activation_samples` calibration tokens, per merged expert, layer by layer;
        compress/gptq.py; with quant_scope "all" also every other linear layer, compress/gptq_linears.py).
        Round to nearest stays the default: on the embedded LM, int4 blocks of 16 of every layer,
        asymmetric, GPTQ gives 19.16 against 19.31 held-out perplexity (dense fp32 18.90), for a
        quantization step several times longer (benchmarks/results/quality-quantized.md).
    calibrate_router: after compression (and distillation), train the routers alone for `router_steps`
        AdamW steps at peak rate `router_lr` (linear decay) on the calibration text, minimising the KL
        divergence from the dense model's next-token distribution; expert weights do not change.
    output_format: "mcsmoe" (our checkpoint) or "standard": a plain checkpoint of the source family
        with G experts and a G-row router (pruning: the kept rows; merging: each group's dominant
        expert's row, a different function from the E-row router + expert -> group map, which
        `calibrate_router` can then fit). Merge-only, unquantized, one G for every layer.
    """

    experts: int | None = None
    adaptive: bool = False
    similarity: str = "router-logits"
    grouping: str = "similarity"
    weighting: str = "frequency"
    permute: bool = True
    rank_ratio: float = 1.0
    rank_energy: float | None = None
    sparse_keep: float = 0.0
    low_rank: str = "svd"
    low_rank_basis: str = "per-expert"
    activation_samples: int = 4096
    output_refit: bool = False
    refit_ridge: float = 1e-2
    refit_tokens: int = 32768
    calib: str | None = None
    max_calib_tokens: int = 32768
    calib_seq_len: int = 128
    distill_steps: int = 0
    distill_lr: float | None = None
    quantize: str | None = None
    quant_block: int = DEFAULT_BLOCK
    quant_symmetric: bool = False
    quant_scope: str = "all"
    quant_method: str = "rtn"
    calibrate_router: bool = False
    router_steps: int = ROUTER_STEPS
    router_lr: float = ROUTER_LR
    output_format: str = "mcsmoe"
    seed: int = 0

    def validate(self) -> None:
        """Raise ParameterError (a UserError naming the field) for values no model could accept."""
        check_rank_ratio(self.rank_ratio)
        if self.experts is not None and self.experts < 1:
            raise ParameterError("experts", f"must be at least 1, not {self.experts}")
        for registry, name in ((SIMILARITIES, self.similarity), (GROUPINGS, self.grouping),
                               (WEIGHTINGS, self.weighting), (LOW_RANK_KINDS, self.low_rank)):
            registry.lookup(name)
        if self.rank_energy is not None:
            check_rank_energy(self.rank_energy)
        check_sparse_keep(self.sparse_keep)
        if self.refit_tokens < 1:
            raise ParameterError("refit_tokens", f"must be at least 1, not {self.refit_tokens}")
        if not 0 < self.refit_ridge < math.inf:
            raise ParameterError("refit_ridge", f"must be a positive finite number, not {self.refit_ridge}")
        self.check_low_rank_basis()
        if self.max_calib_tokens < self.calib_seq_len:
            raise ParameterError("max_calib_tokens", f"must be at least one block of {self.calib_seq_len} tokens, "
                                                     f"not {self.max_calib_tokens}")
        if self.distill_steps < 0:
            raise ParameterError("distill_steps", f"must be 0 or more, not {self.distill_steps}")
        if self.distill_lr is not None and not 0 < self.distill_lr < math.inf:
            raise ParameterError("distill_lr", f"must be a positive finite number, not {self.distill_lr}")
        if self.rank_energy is not None and self.rank_ratio != 1.0:
            raise ParameterError("rank_energy", f"chooses the rank itself; it cannot be combined with rank_ratio "
                                                f"{self.rank_ratio}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ParameterError("quantize", f"must be one of {', '.join(QUANTIZATIONS)}, not {self.quantize!r}")
        if self.quant_method not in QUANT_METHODS:
            methods = ", ".join(QUANT_METHODS)
            raise ParameterError("quant_method", f"must be one of {methods}, not {self.quant_method!r}")
        if self.quant_method != "rtn" and self.quantize is None:
            raise ParameterError("quant_method", f"{self.quant_method} needs quantize int4 or int8")
        if self.quant_block < 16 or self.quant_block & (self.quant_block - 1):
            raise ParameterError("quant_block", f"must be a power of two >= 16, not {self.quant_block}")
        if self.quant_scope not in QUANT_SCOPES:
            raise ParameterError("quant_scope", f"must be one of {', '.join(QUANT_SCOPES)}, not {self.quant_scope!r}")
        if self.router_steps < 1:
            raise ParameterError("router_steps", f"must be at least 1, not {self.router_steps}")
        if not 0 < self.router_lr < math.inf:
            raise ParameterError("router_lr", f"must be a positive finite number, not {self.router_lr}")
        self.check_output_format()

    def check_low_rank_basis(self) -> None:
        """ParameterError unless `low_rank_basis` is known and combines with the other choices."""
        if self.low_rank_basis not in LOW_RANK_BASES:
            raise ParameterError("low_rank_basis", f"must be one of {', '.join(LOW_RANK_BASES)}, "
                                                   f"not {self.low_rank_basis!r}")
        if self.low_rank_basis != "per-expert" and self.rank_energy is not None:
            raise ParameterError("low_rank_basis",
                                 f"{self.low_rank_basis} takes its rank from rank_ratio, not rank_energy")
        if self.low_rank_basis != "per-expert" and self.quantize is not None:
            raise ParameterError("low_rank_basis", f"{self.low_rank_basis} bases are stored float; "
                                                   "quantize per-expert factors instead")

    def check_output_format(self) -> None:
        """ParameterError if `output_format` cannot hold what the recipe builds."""
        if self.output_format not in FORMATS:
            raise ParameterError("output_format", f"must be one of {', '.join(FORMATS)}, not {self.output_format!r}")
        if self.output_format != "standard":
            return
        if self.adaptive:
            raise ParameterError("output_format", "standard cannot express layer-adaptive G (a standard config "
                                                  "has one expert count for every layer)")
        if not self.merge_only:
            raise ParameterError("output_format", "standard holds plain experts; low-rank factors need our format")
        if self.quantize is not None:
            raise ParameterError("output_format", "standard holds plain experts; quantized experts need our format")
    @property
    def quant_spec(self) -> QuantSpec | None:
        """How merged experts are quantized; None: not at all."""
        if self.quantize is None:
            return None
        return QuantSpec(QUANTIZATIONS[self.quantize], self.quant_block, self.quant_symmetric)

    def check_layout(self, layout: ExpertLayout) -> None:
        """ParameterError if `quant_block` does not divide an expert projection's input size."""
        if self.quantize is None:
            return
        sizes = {name: layout.projection_shape(name)[1] for name in layout.projections}
        for name, in_features in sizes.items():
            if in_features % self.quant_block:
                fits = [b for b in (256, 128, 64, 32, 16) if all(size % b == 0 for size in sizes.values())]
                hint = f"; {fits[0]} divides every projection's" if fits else ""
                raise ParameterError("quant_block", f"{self.quant_block} does not divide the input size {in_features} "
                                                    f"of the {name} projection{hint}")

    def check_model(self, num_experts: int) -> None:
        """ParameterError if a model with `num_experts` experts per layer has fewer than the recipe asks for."""
        if self.experts is not None and self.experts > num_experts:
            raise ParameterError(
                "experts", f"must be between 1 and the model's {num_experts} experts per layer, not {self.experts}"
            )

    def groups(self, num_experts: int) -> int:
        """Groups per layer for a model with `num_experts` experts: `experts`, or half of them."""
        return self.experts if self.experts is not None else max(1, num_experts // 2)

    @property
    def calibration_inputs(self) -> int:
        """Block inputs per layer the statistics pass must keep for this recipe's low-rank kind or output
        refit (0: none)."""
        return max(self.low_rank_inputs, self.refit_tokens if self.output_refit else 0)

    @property
    def low_rank_inputs(self) -> int:
        """Block inputs per layer this recipe's low-rank kind fits to (0: none)."""
        return self.activation_samples if LOW_RANK_KINDS.lookup(self.low_rank).needs_calibration_inputs else 0

    @property
    def needs_expert_outputs(self) -> bool:
        """Whether the statistics pass must run every expert on every calibration token (hc, reap)."""
        return self.grouping in NEEDS_EXPERT_OUTPUTS

    @property
    def merge_only(self) -> bool:
        return self.rank_ratio >= 1 and self.rank_energy is None

    @property
    def distill_learning_rate(self) -> float:
        """The peak learning rate distillation uses: `distill_lr`, or the default for this kind of recipe."""
        if self.distill_lr is not None:
            return self.distill_lr
        if self.merge_only:
            return MERGED_DISTILL_LR
        return BASE_DELTA_DISTILL_LR if self.low_rank_basis == "base-delta" else COMPRESSED_DISTILL_LR

    def to_dict(self) -> dict:
        return asdict(self)
