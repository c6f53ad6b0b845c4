"""The recipe: every choice that turns a dense MoE checkpoint into a compressed one."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError
from .lowrank import check_rank_ratio
from .stats import SIMILARITIES

# Default peak learning rates of distillation (linear decay to 0), measured on the embedded model
# (merged 8 -> 4 experts, held-out perplexity 20.64): 1e-3 undoes a good merge (21.97 after 200
# steps, 3e-4 gives 20.52), while a lossy low-rank model recovers more with it (rank ratio 0.55,
# 400 steps: 26.4 at 1e-3, 29.0 at 3e-4).
MERGED_DISTILL_LR = 3e-4
COMPRESSED_DISTILL_LR = 1e-3
GROUPINGS = ("similarity", "random", "drop")
WEIGHTINGS = ("frequency", "uniform")


@dataclass
class CompressionRecipe:
    """What `mcsmoe compress` does; the defaults are M-SMoE followed by MC-SMoE compression.

    experts: groups (merged experts) per layer; None means half the model's experts.
    adaptive: spread the same total of groups over layers by one global frequency threshold.
    similarity: "router-logits" (cosine of logit columns on calibration text) or "router-weights".
    grouping: "similarity" (M-SMoE), or the baselines "random" and "drop" (keep the most used, remove the rest).
    weighting: "frequency" (M-SMoE) or "uniform" averaging inside a group.
    permute: align each member's neurons to its dominant expert before merging.
    rank_ratio: share of a dense projection's parameters kept by its low-rank factors; 1 = merge only.
    rank_energy: if set, pick each layer's rank to keep this share of squared singular values instead.
    sparse_keep: share of rows of the low-rank residual kept as structured-sparse rows.
    activation_aware: fit the input projections' factors to calibration activations
        (minimise the output error rather than the weight error; not in the paper),
        from the first `activation_samples` calibration tokens of each layer.
    calib: calibration text file (.txt or .jsonl) or None for the built-in corpus.
    max_calib_tokens, calib_seq_len: calibration budget in tokens and block length.
    distill_steps: knowledge-distillation steps from the original model (0: none).
    distill_lr: their peak learning rate, decaying linearly to 0; None: MERGED_DISTILL_LR for a
        merge-only recipe, COMPRESSED_DISTILL_LR with low rank (see `distill_learning_rate`).
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
    activation_aware: bool = False
    activation_samples: int = 4096
    calib: str | None = None
    max_calib_tokens: int = 32768
    calib_seq_len: int = 128
    distill_steps: int = 0
    distill_lr: float | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise UserError for values no model could accept."""
        check_rank_ratio(self.rank_ratio)
        if self.experts is not None and self.experts < 1:
            raise UserError(f"--experts must be at least 1, not {self.experts}")
        if self.similarity not in SIMILARITIES:
            raise UserError(f"--similarity must be one of {', '.join(SIMILARITIES)}, not {self.similarity!r}")
        if self.grouping not in GROUPINGS:
            raise UserError(f"grouping must be one of {', '.join(GROUPINGS)}, not {self.grouping!r}")
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {self.weighting!r}")
        if self.rank_energy is not None and not 0 < self.rank_energy <= 1:
            raise UserError(f"--rank-energy must be in (0, 1], not {self.rank_energy}")
        if not 0 <= self.sparse_keep <= 1:
            raise UserError(f"--sparse-keep must be in [0, 1], not {self.sparse_keep}")
        if self.max_calib_tokens < self.calib_seq_len:
            raise UserError(f"--max-calib-tokens must be at least one block of {self.calib_seq_len} tokens")
        if self.distill_steps < 0:
            raise UserError(f"--distill-steps must be 0 or more, not {self.distill_steps}")
        if self.distill_lr is not None and not self.distill_lr > 0:
            raise UserError(f"--distill-lr must be positive, not {self.distill_lr}")

    @property
    def merge_only(self) -> bool:
        return self.rank_ratio >= 1 and self.rank_energy is None

    @property
    def distill_learning_rate(self) -> float:
        """The peak learning rate distillation uses: `distill_lr`, or the default for this kind of recipe."""
        if self.distill_lr is not None:
            return self.distill_lr
        return MERGED_DISTILL_LR if self.merge_only else COMPRESSED_DISTILL_LR

    def to_dict(self) -> dict:
        return asdict(self)
