"""The reference semantics of a compressed MoE block: grouped, merged, low-rank experts.

A layer keeps its router unchanged (E logits per token); `expert_to_group [E]`
sends a token routed to any member of a group to the group's merged expert
(-1: the expert was removed and its picks contribute nothing).
When two of a token's top-k picks land in one group their routing weights add,
so the group runs once per token. Every exported graph is checked against this.

`grouped_moe_forward` is that semantics, the one torch reference: GroupedLowRankExperts
calls it with the family router's picks, and the torch custom op standing for the ONNX
node (exporters/custom_op) with the op's own routing, `route_top_k`.

Each projection of a merged expert is either dense, `W [G, out, in]`, or
low-rank plus structured-sparse rows:

    W_g  =  left_g @ right_g  (+ sparse_values_g placed at rows sparse_rows_g)
    left [G, out, r], right [G, r, in], sparse_rows [G, n] (int64), sparse_values [G, n, in]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
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

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The stored tensors, in the op's input order: weight, or left, right[, sparse_rows, sparse_values]."""
        if self.dense:
            return ("weight",)
        return ("left", "right") + (("sparse_rows", "sparse_values") if self.sparse_rows else ())

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


def _project_group(spec: ProjectionSpec, tensors: Sequence[torch.Tensor], group: int, x: torch.Tensor) -> torch.Tensor:
    """x [n, in] -> [n, out] through group `group` of a projection stored as `tensors` ([G, ...] each,
    `spec.tensor_names` order)."""
    if spec.dense:
        return x @ tensors[0][group].T
    left, right = tensors[0][group], tensors[1][group]
    y = (x @ right.T) @ left.T
    if spec.sparse_rows:
        rows, values = tensors[2][group], tensors[3][group]
        y = y.index_add(1, rows, x @ values.T)  # a repeated row accumulates
    return y


# the op's canonical activation names that Hugging Face spells differently
_HF_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh"}


@functools.cache  # the activations are stateless modules: one instance per name
def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation named `name` (a Hugging Face name, or the op's canonical one)."""
    return ACT2FN[_HF_ACTIVATION.get(name, name)]


def route_top_k(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's routing: router logits [T, E] -> (picked experts [T, k], their weights [T, k], float32).

    Softmax over E in float32, the k largest probabilities, optionally divided by their sum.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return index, weights


def _group_weights(
    expert_to_group: torch.Tensor, num_groups: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and group [T, G]: the routing weight (picks of one group add) and whether it is routed.

    top_k_index [T, k]: picked experts, -1 where the router assigned none; expert_to_group [E].
    """
    groups = expert_to_group[top_k_index.clamp(min=0)]
    # a pick is dropped when the router assigned no expert (-1) or its expert was removed (group -1)
    valid = (top_k_index >= 0) & (groups >= 0)
    groups = groups.clamp(min=0)
    shape = (top_k_index.shape[0], num_groups)
    weights = torch.zeros(shape, dtype=top_k_weights.dtype, device=top_k_weights.device).scatter_add(
        1, groups, torch.where(valid, top_k_weights, torch.zeros_like(top_k_weights))
    )
    routed = torch.zeros(shape, dtype=torch.long, device=groups.device).scatter_add(1, groups, valid.long()) > 0
    return weights, routed


def grouped_moe_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert_to_group: torch.Tensor,
    layout: ExpertLayout,
    projections: Mapping[str, tuple[ProjectionSpec, Sequence[torch.Tensor]]],
) -> torch.Tensor:
    """The GroupedLowRankMoE semantics after routing (docs/ops.md): hidden [T, H] -> [T, H].

    top_k_index, top_k_weights [T, k]: each token's picked experts (-1: none) and weights;
    expert_to_group [E] (-1: removed); projections: {name: (ProjectionSpec, tensors [G, ...])}
    for every name of `layout.projections`. Each group runs once, on the tokens routed to it,
    and its output is added weighted by the sum of those tokens' picks in the group.
    """
    num_groups = projections[layout.projections[0]][1][0].shape[0]
    weights, routed = _group_weights(expert_to_group, num_groups, top_k_index, top_k_weights)
    act = _activation(layout.activation)

    def project(name: str, x: torch.Tensor, group: int) -> torch.Tensor:
        spec, tensors = projections[name]
        return _project_group(spec, tensors, group, x)

    output = torch.zeros_like(hidden)
    for group in range(num_groups):
        tokens = routed[:, group].nonzero().squeeze(-1)
        if tokens.numel() == 0:
            continue
        x = hidden[tokens]
        if layout.gated:
            expert_out = project("down", act(project("gate", x, group)) * project("up", x, group), group)
        else:
            expert_out = project("wo", act(project("wi", x, group)), group)
        expert_out = expert_out * weights[tokens, group, None].to(expert_out.dtype)
        output.index_add_(0, tokens, expert_out.to(output.dtype))
    return output


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

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors, each [G, ...], in `spec.tensor_names` order."""
        return tuple(getattr(self, name) for name in self.spec.tensor_names)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """x [n, in] -> [n, out] through group `group`'s weight."""
        return _project_group(self.spec, self.tensors(), group, x)

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

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.one_hot_dispatch:
            top_k_index = dispatch_to_index(top_k_index)
            top_k_weights = top_k_weights.reshape(-1, 1)
        projections = {name: (proj.spec, proj.tensors()) for name, proj in self.projections.items()}
        return grouped_moe_forward(
            hidden_states, top_k_index, top_k_weights, self.expert_to_group, self.layout, projections
        )

    def extra_repr(self) -> str:
        specs = ", ".join(
            f"{n}={'dense' if p.spec.dense else f'rank {p.spec.rank}+{p.spec.sparse_rows} rows'}"
            for n, p in self.projections.items()
        )
        return f"experts={self.num_experts}, groups={self.num_groups}, {specs}"
