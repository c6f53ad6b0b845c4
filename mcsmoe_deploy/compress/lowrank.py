"""Low-rank plus structured-sparse compression of a merged projection.

W [out, in] ~ L @ R + S, with the SVD initialisation L = U sqrt(s), R = sqrt(s) V^T
at rank r, and S the residual W - L R pruned to its largest rows (whole rows, so
the sparse part stays a gather/scatter of dense rows in any runtime).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass
class LowRankSparse:
    """left [out, r], right [r, in], sparse_rows [n] (int64, ascending), sparse_values [n, in]."""

    left: torch.Tensor
    right: torch.Tensor
    sparse_rows: torch.Tensor
    sparse_values: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The [out, in] weight this stands for."""
        weight = self.left @ self.right
        return weight.index_add(0, self.sparse_rows, self.sparse_values)


def check_rank_ratio(rank_ratio: float) -> None:
    if not 0 < rank_ratio <= 1:
        raise UserError(f"--rank-ratio must be in (0, 1], not {rank_ratio}")


def rank_for_ratio(out_features: int, in_features: int, rank_ratio: float) -> int | None:
    """Rank whose factors hold `rank_ratio` of the dense projection's parameters; None: keep dense.

    A rank at which factors would hold as much as the dense weight is no
    compression, so ratio 1 (merge only) and such ranks return None.
    """
    check_rank_ratio(rank_ratio)
    if rank_ratio >= 1:
        return None
    rank = max(1, math.floor(rank_ratio * out_features * in_features / (out_features + in_features)))
    return None if rank >= min(out_features, in_features) else rank


def rank_for_energy(weights: list[torch.Tensor], energy: float) -> int:
    """Smallest rank that keeps `energy` of the squared singular values of every weight in `weights`."""
    if not 0 < energy <= 1:
        raise UserError(f"--rank-energy must be in (0, 1], not {energy}")
    rank = 1
    for weight in weights:
        squared = torch.linalg.svdvals(weight.double()) ** 2
        kept = torch.cumsum(squared, 0) / squared.sum().clamp(min=1e-300)
        rank = max(rank, int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1)
    return min(rank, min(weights[0].shape))


def sparse_row_count(out_features: int, sparse_keep: float) -> int:
    """Rows of the residual kept for a kept fraction `sparse_keep` of [0, 1]."""
    if not 0 <= sparse_keep <= 1:
        raise UserError(f"--sparse-keep must be in [0, 1], not {sparse_keep}")
    return math.ceil(sparse_keep * out_features) if sparse_keep > 0 else 0


def low_rank_sparse(
    weight: torch.Tensor, rank: int, sparse_rows: int, input_second_moment: torch.Tensor | None = None
) -> LowRankSparse:
    """Rank-`rank` SVD factors of `weight` [out, in] plus its residual's `sparse_rows` largest rows.

    Plain (the paper): the factors minimise ||W - L R||_F and rows are ranked by L2 norm.
    With `input_second_moment` C = E[x x^T] [in, in] (activation-aware): the factors
    minimise the expected output error E||(W - L R) x||^2, by factoring W C^(1/2)
    and mapping back, and rows are ranked by their output error.
    """
    w = weight.double()
    root = inverse_root = None
    if input_second_moment is not None:
        values, vectors = torch.linalg.eigh(input_second_moment.double().to(w.device))
        # a floor keeps the square root invertible where calibration saw no variance
        values = values.clamp(min=float(values.max()) * 1e-6)
        root = (vectors * values.sqrt()) @ vectors.T
        inverse_root = (vectors / values.sqrt()) @ vectors.T
    u, s, vh = torch.linalg.svd(w if root is None else w @ root, full_matrices=False)
    scale = s[:rank].sqrt()
    left = u[:, :rank] * scale
    right = scale[:, None] * vh[:rank]
    if inverse_root is not None:
        right = right @ inverse_root
    residual = w - left @ right
    scores = (residual if root is None else residual @ root).norm(dim=1)
    rows = torch.topk(scores, sparse_rows).indices.sort().values if sparse_rows else torch.zeros(0, dtype=torch.long)
    return LowRankSparse(
        left=left.to(weight.dtype),
        right=right.to(weight.dtype),
        sparse_rows=rows.to(weight.device),
        sparse_values=residual[rows].to(weight.dtype),
    )
