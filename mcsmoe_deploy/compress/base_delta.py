"""Base plus low-rank deltas: one full-rank base per layer and projection, each merged expert's own
low-rank delta from it (D2-MoE style; an option beyond the paper).

Experts upcycled from one FFN, or merged from such experts, stay close to one another: their
weights differ from their common mean by much less than they differ from zero. Per-expert SVD and a
shared basis spend their whole budget on the weights themselves; here one dense base [out, in]
holds what the experts have in common and the rest of the budget goes to each group's difference:

    W_g ~ base + left_g @ right_g  (+ sparse rows of the residual)

base: the frequency-weighted mean of the layer's merged experts (the token-weighted average expert,
so the base is right where most tokens go); left_g, right_g: rank-r factors of W_g - base, plain
SVD or whitened by the group's calibration inputs (activation-aware, lowrank.low_rank_sparse).
The rank is the one at which the base and G groups' factors hold as many numbers as per-expert
factors at the same rank ratio (equal bytes, `base_delta_rank_for_ratio`).

Measured on the embedded LM (benchmarks/results/quality-shared-basis.md): at 29.5% of the expert
bytes, whitened, held-out perplexity before recovery 21.1 at G = 8 against 25.5 for the whitened
shared basis at G = 4 (dense 18.9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ParameterError
from .lowrank import check_rank_ratio, low_rank_sparse


@dataclass
class BaseDelta:
    """A layer's projection as a shared base [out, in] and per-group rank-r deltas.

    left [G, out, r], right [G, r, in]; sparse_rows [G, n] (int64, ascending per group) and
    sparse_values [G, n, in]: each group's residual rows kept.
    """

    base: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    sparse_rows: torch.Tensor
    sparse_values: torch.Tensor

    def dense(self, group: int) -> torch.Tensor:
        """Group `group`'s [out, in] weight."""
        weight = self.base + self.left[group] @ self.right[group]
        return weight.index_add(0, self.sparse_rows[group], self.sparse_values[group])


def base_delta_rank_for_ratio(out_features: int, in_features: int, num_groups: int, rank_ratio: float) -> int:
    """Rank of each group's delta at which a base and `num_groups` groups' factors hold as many numbers
    as `num_groups` per-group factors keeping `rank_ratio` of each dense projection (equal bytes).

    ParameterError when the base alone takes that budget (rank_ratio <= 1 / num_groups, or ratio 1,
    which keeps the merged experts dense).
    """
    check_rank_ratio(rank_ratio)
    dense = out_features * in_features
    rank = math.floor((rank_ratio * num_groups - 1) * dense / (num_groups * (out_features + in_features)))
    if rank_ratio >= 1 or rank < 1:
        raise ParameterError("rank_ratio", f"{rank_ratio} leaves no room for deltas beside the base with "
                                           f"{num_groups} groups (base-delta needs 1/G < rank_ratio < 1)")
    return min(rank, out_features, in_features)


def frequency_weighted_mean(weights: list[torch.Tensor], frequencies: list[float] | None) -> torch.Tensor:
    """sum_g f_g W_g / sum_g f_g of G weights [out, in] (float64); the plain mean when `frequencies` is
    None or sums to 0."""
    total = sum(frequencies) if frequencies is not None else 0.0
    shares = ([f / total for f in frequencies] if total > 0 else [1.0 / len(weights)] * len(weights))
    return sum(share * w.double() for share, w in zip(shares, weights))


def base_delta(
    weights: list[torch.Tensor], rank: int, sparse_rows: int = 0,
    input_moments: list[torch.Tensor] | None = None, frequencies: list[float] | None = None,
) -> BaseDelta:
    """Fit a base shared by `weights` (G matrices [out, in]) and each one's rank-`rank` delta from it.

    input_moments: per weight, E[x x^T] [in, in] of its inputs (deltas whitened: each minimises its
    group's output error), or None (plain SVD of each delta). frequencies: per weight, the routing
    share of its group (the base's weights). sparse_rows: per weight, its residual's largest rows kept.
    """
    base = frequency_weighted_mean(weights, frequencies)
    fits = [low_rank_sparse(w.double() - base, rank, sparse_rows,
                            None if input_moments is None else input_moments[g])
            for g, w in enumerate(weights)]
    dtype = weights[0].dtype
    return BaseDelta(
        base=base.to(dtype),
        left=torch.stack([f.left for f in fits]).to(dtype),
        right=torch.stack([f.right for f in fits]).to(dtype),
        sparse_rows=torch.stack([f.sparse_rows for f in fits]),
        sparse_values=torch.stack([f.sparse_values for f in fits]).to(dtype),
    )
