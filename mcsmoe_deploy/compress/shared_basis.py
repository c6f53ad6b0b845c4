"""Shared-basis low rank: one basis per layer and projection for all merged experts (an option beyond the paper).

Per-expert SVD spends rank on each merged expert alone. Merged experts of one layer
come from one ancestor (upcycling) or see the same hidden space, so their weights
share much of a subspace (D2-MoE, Sub-MoE, MoBE). A shared basis stores that
subspace once and each group's coefficients in it:

    right shared (input side, gate / up / wi: a basis of the hidden space H)
        W_g ~ left_g @ right,   right [r, in] for the layer, left_g [out, r]
    left shared (output side, down / wo: again a basis of H)
        W_g ~ left @ right_g,   left [out, r] for the layer, right_g [r, in]

Both keep the shared basis on the hidden-size side, which all experts of a layer
read from and write to. At equal bytes the rank is larger than per-expert SVD's, as
the basis is paid once (`shared_rank_for_ratio`).

Fitting is a joint SVD of the layer's stacked weights (Sub-MoE), optionally whitened
(activation-aware, SVD-LLM / D2-MoE): with input second moments C_g = E[x x^T] of each
group, the factors minimise the groups' output errors E||(W_g - L_g R_g) x||^2:
- right shared: the basis is the top right singular vectors of [W_1 C^(1/2); ...; W_G C^(1/2)]
  (C the groups' mean moment, as the basis must serve them all), mapped back by C^(-1/2); each
  group's coefficients are then the least-squares fit under its own C_g;
- left shared: the basis is the top left singular vectors of [W_1 C_1^(1/2), ..., W_G C_G^(1/2)];
  each group's right factor is the projection of W_g on it (optimal for any C_g).
When the groups' weights lie in a common subspace of dimension r, rank r is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models import ExpertLayout
from .lowrank import check_rank_ratio

# which low-rank structure a recipe asks for: per-expert factors (the paper), a basis shared per layer,
# or a full-rank base shared per layer plus per-expert low-rank deltas (compress/base_delta.py)
LOW_RANK_BASES = ("per-expert", "shared", "base-delta")


@dataclass
class SharedBasis:
    """A layer's projection as a shared basis and per-group factors.

    side: "right" (shared [r, in], per_group [out, r] each) or "left" (shared [out, r], per_group
    [r, in] each); sparse_rows [G, n] (int64, ascending per group) and sparse_values [G, n, in]:
    each group's residual rows kept.
    """

    side: str
    shared: torch.Tensor
    per_group: list[torch.Tensor]
    sparse_rows: torch.Tensor
    sparse_values: torch.Tensor

    def dense(self, group: int) -> torch.Tensor:
        """Group `group`'s [out, in] weight."""
        left, right = ((self.per_group[group], self.shared) if self.side == "right"
                       else (self.shared, self.per_group[group]))
        return (left @ right).index_add(0, self.sparse_rows[group], self.sparse_values[group])


def shared_side(name: str, layout: ExpertLayout) -> str:
    """The factor of projection `name` that is shared: the one on the hidden-size side."""
    return "right" if name in layout.input_projections else "left"


def shared_rank_for_ratio(out_features: int, in_features: int, num_groups: int, side: str,
                          rank_ratio: float) -> int | None:
    """Rank at which a shared basis and `num_groups` groups' factors hold as many numbers as per-group
    factors keeping `rank_ratio` of each dense projection (equal bytes); None: keep dense (ratio 1)."""
    check_rank_ratio(rank_ratio)
    if rank_ratio >= 1:
        return None
    shared, own = (in_features, out_features) if side == "right" else (out_features, in_features)
    rank = math.floor(rank_ratio * num_groups * out_features * in_features / (shared + num_groups * own))
    return max(1, min(rank, shared, num_groups * own))


def _roots(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C^(1/2) and C^(-1/2) of a second moment [d, d] (float64), eigenvalues floored as in low_rank_sparse."""
    values, vectors = torch.linalg.eigh(moment.double())
    values = values.clamp(min=float(values.max()) * 1e-6)
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


def shared_basis(
    weights: list[torch.Tensor], rank: int, side: str, sparse_rows: int = 0,
    input_moments: list[torch.Tensor] | None = None,
) -> SharedBasis:
    """Fit a basis shared by `weights` (G matrices [out, in]) and each one's factor at rank `rank`.

    side: "right" or "left" (module docstring). input_moments: per weight, E[x x^T] [in, in] of
    its inputs (whitened fit), or None (plain joint SVD of the weights). sparse_rows: per weight,
    its residual's largest rows (by output error when whitened) kept exactly.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be right or left, not {side!r}")
    ws = [w.double() for w in weights]
    in_features = ws[0].shape[1]
    moments = ([m.double().to(ws[0].device) for m in input_moments] if input_moments is not None
               else [torch.eye(in_features, dtype=torch.float64, device=ws[0].device)] * len(ws))
    roots = [_roots(m)[0] for m in moments] if input_moments is not None else [None] * len(ws)
    # balance the factors' scales (sqrt of the singular values on the basis, the rest on the
    # coefficients, per group on average), as per-expert SVD does: distillation steps both alike
    if side == "right":
        root, inverse_root = _roots(sum(moments) / len(moments))
        _, s, vh = torch.linalg.svd(torch.cat([w @ root for w in ws]), full_matrices=False)
        basis = ((s[:rank] / math.sqrt(len(ws))).sqrt()[:, None] * vh[:rank]) @ inverse_root  # [r, in]
        # least squares under each group's own inputs: L_g = W_g C_g B^T (B C_g B^T)^(-1)
        per_group = []
        for w, c in zip(ws, moments):
            gram = basis @ c @ basis.T
            gram = gram + torch.eye(rank, dtype=gram.dtype, device=gram.device) * float(gram.diagonal().mean()) * 1e-12
            per_group.append(torch.linalg.solve(gram, basis @ c @ w.T).T)
        lefts, rights = per_group, [basis] * len(ws)
    else:
        stacked = torch.cat([w if r is None else w @ r for w, r in zip(ws, roots)], dim=1)
        u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
        basis = u[:, :rank] * (s[:rank] / math.sqrt(len(ws))).sqrt()  # [out, r]
        pinv = torch.linalg.pinv(basis)
        per_group = [pinv @ w for w in ws]  # the best R_g whatever C_g: the error lies in output space
        lefts, rights = [basis] * len(ws), per_group
    kept_rows, kept_values = [], []
    for w, left, right, r in zip(ws, lefts, rights, roots):
        residual = w - left @ right
        scores = (residual if r is None else residual @ r).norm(dim=1)
        rows = (torch.topk(scores, sparse_rows).indices.sort().values if sparse_rows
                else torch.zeros(0, dtype=torch.long, device=w.device))
        kept_rows.append(rows)
        kept_values.append(residual[rows])
    dtype = weights[0].dtype
    return SharedBasis(
        side=side,
        shared=basis.to(dtype),
        per_group=[f.to(dtype) for f in per_group],
        sparse_rows=torch.stack(kept_rows),
        sparse_values=torch.stack(kept_values).to(dtype),
    )
