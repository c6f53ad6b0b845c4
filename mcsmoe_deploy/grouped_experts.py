"""The reference semantics of a compressed MoE block: grouped, merged, low-rank experts.

A layer keeps its router unchanged (E logits per token); `expert_to_group [E]`
sends a token routed to any member of a group to the group's merged expert
(-1: the expert was removed and its picks contribute nothing).
When two of a token's top-k picks land in one group their routing weights add,
so the group runs once per token. Every exported graph is checked against this.

Each projection of a merged expert is either dense, `W [G, out, in]`, or
low-rank plus structured-sparse rows:

    W_g  =  left_g @ right_g  (+ sparse_values_g placed at rows sparse_rows_g)
    left [G, out, r], right [G, r, in], sparse_rows [G, n] (int64), sparse_values [G, n, in]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from .models.base import ExpertLayout, ExpertWeights, dispatch_to_index


@dataclass(frozen=True)
class ProjectionSpec:
    """How one projection of a layer is stored: dense, or rank-r factors plus n sparse rows."""

    out_features: int
    in_features: int
    rank: int | None = None  # None: dense
    sparse_rows: int = 0

    @property
    def dense(self) -> bool:
        return self.rank is None

    def parameters_per_group(self) -> int:
        """Stored numbers per merged expert (sparse row indices counted as one number each)."""
        if self.dense:
            return self.out_features * self.in_features
        return self.rank * (self.out_features + self.in_features) + self.sparse_rows * (self.in_features + 1)

    def to_dict(self) -> dict:
        return {"out": self.out_features, "in": self.in_features, "rank": self.rank, "sparse_rows": self.sparse_rows}

    @classmethod
    def from_dict(cls, data: dict) -> ProjectionSpec:
        return cls(data["out"], data["in"], data["rank"], data["sparse_rows"])


class GroupedProjection(nn.Module):
    """G stacked weights of one projection (dense, or low-rank + sparse rows)."""

    def __init__(self, num_groups: int, spec: ProjectionSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        out_f, in_f = spec.out_features, spec.in_features
        if spec.dense:
            self.weight = nn.Parameter(torch.zeros(num_groups, out_f, in_f, dtype=dtype))
            return
        self.left = nn.Parameter(torch.zeros(num_groups, out_f, spec.rank, dtype=dtype))
        self.right = nn.Parameter(torch.zeros(num_groups, spec.rank, in_f, dtype=dtype))
        if spec.sparse_rows:
            self.register_buffer("sparse_rows", torch.zeros(num_groups, spec.sparse_rows, dtype=torch.long))
            self.sparse_values = nn.Parameter(torch.zeros(num_groups, spec.sparse_rows, in_f, dtype=dtype))

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """x [n, in] -> [n, out] through group `group`'s weight."""
        if self.spec.dense:
            return x @ self.weight[group].T
        y = (x @ self.right[group].T) @ self.left[group].T
        if self.spec.sparse_rows:
            y = y.index_add(1, self.sparse_rows[group], x @ self.sparse_values[group].T)
        return y

    def dense_weight(self) -> torch.Tensor:
        """The full weights [G, out, in] this projection stands for."""
        if self.spec.dense:
            return self.weight.detach().clone()
        weight = self.left.detach() @ self.right.detach()
        if self.spec.sparse_rows:
            for g in range(weight.shape[0]):
                weight[g].index_add_(0, self.sparse_rows[g], self.sparse_values[g].detach())
        return weight


class GroupedLowRankExperts(nn.Module):
    """Drop-in replacement for a family's experts module, holding G merged experts.

    Called like the module it replaces: `(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]`, or, for Switch Transformers
    (`one_hot_dispatch`), `(hidden [T, H], dispatch [T, 1, E], weights [T, 1])`.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        expert_to_group: list[int],
        projections: dict[str, ProjectionSpec],
        one_hot_dispatch: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.layout = layout
        self.num_groups = max(expert_to_group) + 1
        self.num_experts = len(expert_to_group)
        self.one_hot_dispatch = one_hot_dispatch
        self.register_buffer("expert_to_group", torch.tensor(expert_to_group, dtype=torch.long))
        self.projections = nn.ModuleDict(
            {name: GroupedProjection(self.num_groups, projections[name], dtype) for name in layout.projections}
        )
        self.act_fn = ACT2FN[layout.activation]

    @classmethod
    def from_dense(
        cls, layout: ExpertLayout, experts: list[ExpertWeights], one_hot_dispatch: bool = False, dtype=torch.float32
    ) -> GroupedLowRankExperts:
        """E unmerged experts as G = E dense groups with identity grouping: the same function, stored our way."""
        specs = {name: ProjectionSpec(*layout.projection_shape(name)) for name in layout.projections}
        module = cls(layout, list(range(len(experts))), specs, one_hot_dispatch, dtype)
        with torch.no_grad():
            for name in layout.projections:
                for group, expert in enumerate(experts):
                    module.projections[name].weight[group] = expert[name]
        return module

    def expert_forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """Merged expert `group` on x [n, H] -> [n, H]."""
        p = self.projections
        if self.layout.gated:
            hidden = self.act_fn(p["gate"](x, group)) * p["up"](x, group)
            return p["down"](hidden, group)
        return p["wo"](self.act_fn(p["wi"](x, group)), group)

    def group_weights(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token and group [T, G]: the routing weight (picks of one group add) and whether it is routed."""
        groups = self.expert_to_group[top_k_index.clamp(min=0)]
        # a pick is dropped when the router assigned no expert (-1) or its expert was removed (group -1)
        valid = (top_k_index >= 0) & (groups >= 0)
        groups = groups.clamp(min=0)
        shape = (top_k_index.shape[0], self.num_groups)
        weights = torch.zeros(shape, dtype=top_k_weights.dtype, device=top_k_weights.device).scatter_add(
            1, groups, torch.where(valid, top_k_weights, torch.zeros_like(top_k_weights))
        )
        routed = torch.zeros(shape, dtype=torch.long, device=groups.device).scatter_add(1, groups, valid.long()) > 0
        return weights, routed

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.one_hot_dispatch:
            top_k_index = dispatch_to_index(top_k_index)
            top_k_weights = top_k_weights.reshape(-1, 1)
        weights, routed_mask = self.group_weights(top_k_index, top_k_weights)
        output = torch.zeros_like(hidden_states)
        for group in range(self.num_groups):
            tokens = routed_mask[:, group].nonzero().squeeze(-1)
            if tokens.numel() == 0:
                continue
            expert_out = self.expert_forward(hidden_states[tokens], group)
            expert_out = expert_out * weights[tokens, group, None].to(expert_out.dtype)
            output.index_add_(0, tokens, expert_out.to(output.dtype))
        return output

    def extra_repr(self) -> str:
        specs = ", ".join(
            f"{n}={'dense' if p.spec.dense else f'rank {p.spec.rank}+{p.spec.sparse_rows} rows'}"
            for n, p in self.projections.items()
        )
        return f"experts={self.num_experts}, groups={self.num_groups}, {specs}"
