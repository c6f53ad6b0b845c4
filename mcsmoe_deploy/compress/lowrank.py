"""Low-rank plus structured-sparse compression of a merged projection.

W [out, in] ~ L @ R + S, with the SVD initialisation L = U sqrt(s), R = sqrt(s) V^T
at rank r, and S the residual W - L R pruned to its largest rows (whole rows, so
the sparse part stays a gather/scatter of dense rows in any runtime).

How the factors are fitted is a low-rank kind registered by name in LOW_RANK_KINDS:
"svd" (the paper: weight error) here, "activation-aware" in activation_aware.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ParameterError
from ..models import ExpertLayout, ExpertWeights
from .grouping import LayerGrouping
from .registry import Registry


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


# (merged experts, calibration samples (inputs [n, H], assigned experts [n, k]) or None, grouping, layout)
# -> per merged expert {projection: E[x x^T] of its input [in, in]}, or None to fit the weights alone
InputMoments = Callable[
    [list[ExpertWeights], tuple[torch.Tensor, torch.Tensor] | None, LayerGrouping, ExpertLayout],
    list[dict[str, torch.Tensor]] | None,
]


@dataclass(frozen=True)
class LowRankKind:
    """How a low-rank kind fits factors: whether it needs calibration inputs kept by the statistics
    pass, and the input second moments it weights each projection's error by (None: plain SVD)."""

    needs_calibration_inputs: bool
    input_moments: InputMoments


LOW_RANK_KINDS: Registry[LowRankKind] = Registry("low_rank")


def register_low_rank(name: str, needs_calibration_inputs: bool) -> Callable[[InputMoments], InputMoments]:
    """Decorator filing an `input_moments` function as the low-rank kind `name`."""

    def add(input_moments: InputMoments) -> InputMoments:
        LOW_RANK_KINDS.register(name)(LowRankKind(needs_calibration_inputs, input_moments))
        return input_moments

    return add


@register_low_rank("svd", needs_calibration_inputs=False)
def no_input_moments(
    merged: list[ExpertWeights],
    samples: tuple[torch.Tensor, torch.Tensor] | None,
    grouping: LayerGrouping,
    layout: ExpertLayout,
) -> None:
    """The paper's SVD: factors minimise the weight error, whatever the inputs."""
    return None


def check_rank_ratio(rank_ratio: float) -> None:
    """ParameterError unless `rank_ratio` is in (0, 1]."""
    if not 0 < rank_ratio <= 1:
        raise ParameterError("rank_ratio", f"must be in (0, 1], not {rank_ratio}")


def check_rank_energy(energy: float) -> None:
    """ParameterError unless `energy` is in (0, 1]."""
    if not 0 < energy <= 1:
        raise ParameterError("rank_energy", f"must be in (0, 1], not {energy}")


def check_sparse_keep(sparse_keep: float) -> None:
    """ParameterError unless `sparse_keep` is in [0, 1]."""
    if not 0 <= sparse_keep <= 1:
        raise ParameterError("sparse_keep", f"must be in [0, 1], not {sparse_keep}")


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
    check_rank_energy(energy)
    rank = 1
    for weight in weights:
        squared = torch.linalg.svdvals(weight.double()) ** 2
        kept = torch.cumsum(squared, 0) / squared.sum().clamp(min=1e-300)
        rank = max(rank, int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1)
    return min(rank, min(weights[0].shape))


def sparse_row_count(out_features: int, sparse_keep: float) -> int:
    """Rows of the residual kept for a kept fraction `sparse_keep` of [0, 1]."""
    check_sparse_keep(sparse_keep)
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
