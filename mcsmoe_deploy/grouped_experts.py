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

A shared-basis projection (`shared` "right" or "left") stores one factor for all G groups, without
the group axis: `right [r, in]` (a basis of the input space; `left [G, out, r]` the per-group
coefficients) or `left [out, r]` (a basis of the output space; `right [G, r, in]`); W_g is then
left_g @ right or left @ right_g (compress/shared_basis.py fits them). A base-delta projection
(`shared` "base", D2-MoE style) keeps per-group factors and adds one full-rank `base [out, in]`
shared by all groups: W_g = base + left_g @ right_g (compress/base_delta.py fits it).

A quantized projection stores each factor (weight, or left and right) as blockwise codes
(see quantization.py): `<factor>_codes [G, rows, cols * bits / 8]` uint8 (int4 packed two per
byte), `<factor>_scales [G, rows, cols / block]` and, when asymmetric, `<factor>_zero_points
[G, rows, cols / block]` uint8; the factor is `(codes - zero_point) * scale`. Sparse rows stay float.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from .models.base import ExpertLayout, ExpertWeights, dispatch_to_index
from .quantization import QuantizedWeight, QuantSpec, dequantize_stored, quantize


# which stored tensor of a low-rank projection is one for all groups (None: none): the right or left
# factor (a shared basis), or "base", a full-rank [out, in] weight added to every group's factors
SHARED_SIDES = (None, "right", "left", "base")
SHARED_BASE = "base"


@dataclass(frozen=True)
class ProjectionSpec:
    """How one projection of a layer is stored: dense, or rank-r factors plus n sparse rows; each
    factor float, or blockwise-quantized by `quant`."""

    out_features: int
    in_features: int
    rank: int | None = None  # None: dense
    sparse_rows: int = 0
    quant: QuantSpec | None = None
    shared: str | None = None  # low rank only: "right" or "left" (the factor one for all groups) or "base"

    def __post_init__(self) -> None:
        if self.shared not in SHARED_SIDES:
            raise ValueError(f"shared must be one of {SHARED_SIDES}, not {self.shared!r}")
        if self.shared is not None and (self.rank is None or self.quant is not None):
            raise ValueError("a shared basis needs a float low-rank projection")

    @property
    def dense(self) -> bool:
        return self.rank is None

    @property
    def factors(self) -> tuple[str, ...]:
        """The matrices whose product is the projection: weight, or left and right."""
        return ("weight",) if self.dense else ("left", "right")

    def factor_shape(self, factor: str) -> tuple[int, int]:
        """[rows, cols] of one factor, per group."""
        return {"weight": (self.out_features, self.in_features), "left": (self.out_features, self.rank),
                "right": (self.rank, self.in_features), SHARED_BASE: (self.out_features, self.in_features)}[factor]

    def stacked(self, tensor: str) -> bool:
        """Whether stored tensor `tensor` has the group axis [G, ...] (all but a shared factor)."""
        return tensor != self.shared

    def factor_tensor_names(self, factor: str) -> tuple[str, ...]:
        """The stored tensors of one factor: itself, or its codes, scales[, zero points]."""
        if self.quant is None:
            return (factor,)
        zero_points = () if self.quant.symmetric else (f"{factor}_zero_points",)
        return (f"{factor}_codes", f"{factor}_scales") + zero_points

    @property
    def has_base(self) -> bool:
        """Whether a full-rank base shared by all groups is added to the factors (W_g = base + left_g @ right_g)."""
        return self.shared == SHARED_BASE

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The stored tensors, in the op's input order: the factors' tensors, the base (when shared "base"),
        then sparse_rows, sparse_values."""
        names = tuple(name for factor in self.factors for name in self.factor_tensor_names(factor))
        names += (SHARED_BASE,) if self.has_base else ()
        return names + (("sparse_rows", "sparse_values") if self.sparse_rows else ())

    def parameters_per_group(self) -> int:
        """Stored numbers per merged expert (sparse row indices counted as one number each; a shared
        factor counted whole, once per group: see `stored_parameters` for a layer's total)."""
        if self.dense:
            return self.out_features * self.in_features
        base = self.out_features * self.in_features if self.has_base else 0
        return base + self.rank * (self.out_features + self.in_features) + self.sparse_rows * (self.in_features + 1)

    def stored_parameters(self, num_groups: int) -> int:
        """Stored numbers of all `num_groups` groups, a shared factor once."""
        total = num_groups * self.parameters_per_group()
        if self.shared is not None:
            rows, cols = self.factor_shape(self.shared)
            total -= (num_groups - 1) * rows * cols
        return total

    def to_dict(self) -> dict:
        data = {"out": self.out_features, "in": self.in_features, "rank": self.rank, "sparse_rows": self.sparse_rows}
        if self.quant is not None:
            data["quant"] = self.quant.to_dict()
        if self.shared is not None:  # absent otherwise: older checkpoints and readers are unchanged
            data["shared"] = self.shared
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ProjectionSpec:
        quant = QuantSpec.from_dict(data["quant"]) if data.get("quant") else None
        return cls(data["out"], data["in"], data["rank"], data["sparse_rows"], quant, data.get("shared"))


def group_slices(spec: ProjectionSpec, tensors: Sequence[torch.Tensor], group: int) -> dict[str, torch.Tensor]:
    """{stored tensor name: group `group`'s slice} of a projection stored as `tensors` (`spec.tensor_names`
    order); a shared factor is the same for every group."""
    return {name: tensor[group] if spec.stacked(name) else tensor for name, tensor in zip(spec.tensor_names, tensors)}


def stacked_groups(spec: ProjectionSpec, tensors: Sequence[torch.Tensor]) -> int:
    """G, from the first tensor with the group axis."""
    return next(t for name, t in zip(spec.tensor_names, tensors) if spec.stacked(name)).shape[0]


def _factor(spec: ProjectionSpec, stored: dict[str, torch.Tensor], factor: str, dtype: torch.dtype) -> torch.Tensor:
    """One group's factor [rows, cols] from its stored tensors (dequantized when quantized)."""
    if spec.quant is None:
        return stored[factor]
    zero_points = stored.get(f"{factor}_zero_points")
    return dequantize_stored(spec.quant, stored[f"{factor}_codes"], stored[f"{factor}_scales"], zero_points, dtype)


def _project_group(spec: ProjectionSpec, tensors: Sequence[torch.Tensor], group: int, x: torch.Tensor) -> torch.Tensor:
    """x [n, in] -> [n, out] through group `group` of a projection stored as `tensors` ([G, ...] each,
    `spec.tensor_names` order)."""
    stored = group_slices(spec, tensors, group)
    if spec.dense:
        return x @ _factor(spec, stored, "weight", x.dtype).T
    left, right = _factor(spec, stored, "left", x.dtype), _factor(spec, stored, "right", x.dtype)
    y = (x @ right.T) @ left.T
    if spec.has_base:
        y = y + x @ stored[SHARED_BASE].T
    if spec.sparse_rows:
        y = y.index_add(1, stored["sparse_rows"], x @ stored["sparse_values"].T)  # a repeated row accumulates
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
    num_groups = stacked_groups(*projections[layout.projections[0]])
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
    """G stacked weights of one projection (dense, or low-rank + sparse rows; float or quantized factors)."""

    def __init__(self, num_groups: int, spec: ProjectionSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        for factor in spec.factors:
            rows, cols = spec.factor_shape(factor)
            if spec.quant is None:
                shape = (num_groups, rows, cols) if spec.stacked(factor) else (rows, cols)
                setattr(self, factor, nn.Parameter(torch.zeros(shape, dtype=dtype)))
                continue
            quant = spec.quant
            blocks = cols // quant.block
            # codes and scales are not trained: buffers, saved with the model
            self.register_buffer(f"{factor}_codes", torch.zeros(num_groups, rows, cols * quant.bits // 8, dtype=torch.uint8))
            self.register_buffer(f"{factor}_scales", torch.zeros(num_groups, rows, blocks, dtype=dtype))
            if not quant.symmetric:
                self.register_buffer(f"{factor}_zero_points", torch.zeros(num_groups, rows, blocks, dtype=torch.uint8))
        if spec.has_base:
            self.base = nn.Parameter(torch.zeros(spec.factor_shape(SHARED_BASE), dtype=dtype))
        if spec.sparse_rows:
            self.register_buffer("sparse_rows", torch.zeros(num_groups, spec.sparse_rows, dtype=torch.long))
            self.sparse_values = nn.Parameter(torch.zeros(num_groups, spec.sparse_rows, spec.in_features, dtype=dtype))

    @property
    def num_groups(self) -> int:
        return stacked_groups(self.spec, self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors, each [G, ...], in `spec.tensor_names` order."""
        return tuple(getattr(self, name) for name in self.spec.tensor_names)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """x [n, in] -> [n, out] through group `group`'s weight."""
        return _project_group(self.spec, self.tensors(), group, x)

    def factor(self, factor: str, group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Group `group`'s factor ("weight", "left" or "right") as a float matrix [rows, cols]."""
        stored = {name: t.detach() for name, t in group_slices(self.spec, self.tensors(), group).items()}
        return _factor(self.spec, stored, factor, dtype)

    def dense_weight(self) -> torch.Tensor:
        """The full weights [G, out, in] this projection stands for."""
        groups = []
        for g in range(self.num_groups):
            weight = self.factor("weight", g) if self.spec.dense else self.factor("left", g) @ self.factor("right", g)
            if self.spec.has_base:
                weight = weight + self.base.detach().float()
            if self.spec.sparse_rows:
                weight = weight.index_add(0, self.sparse_rows[g], self.sparse_values[g].detach().float())
            groups.append(weight)
        return torch.stack(groups)

    def quantized(
        self, quant: QuantSpec, quantize_weight: Callable[..., QuantizedWeight] = quantize,
        factors: Mapping[str, Sequence[QuantizedWeight]] | None = None,
    ) -> GroupedProjection:
        """A copy whose factors are quantized by `quant`, group by group, by `quantize_weight(W [rows, cols],
        quant)` (default: round to nearest); sparse rows are copied as they are. UserError when
        `quant.block` does not divide a factor's columns.

        factors: each factor's quantized weights, one per group, made by another quantizer with the
        same `quant` (compress/gptq.py), used instead of `quantize_weight`.
        """
        if self.spec.quant is not None:
            raise ValueError("the projection is already quantized")
        if self.spec.shared is not None:
            raise ValueError("a shared-basis projection cannot be quantized (recipe.validate refuses it)")
        spec = dataclasses.replace(self.spec, quant=quant)
        for factor in spec.factors:
            quant.check_shape(spec.factor_shape(factor), f"{factor} factor")
        copy = GroupedProjection(self.num_groups, spec, self.tensors()[0].dtype)
        with torch.no_grad():
            for factor in spec.factors:
                for g in range(self.num_groups):
                    result = quantize_weight(getattr(self, factor)[g], quant) if factors is None else factors[factor][g]
                    if result.spec != quant or result.shape != spec.factor_shape(factor):
                        raise ValueError(f"{factor} factor of group {g}: quantized {result.shape} by {result.spec}, "
                                         f"expected {spec.factor_shape(factor)} by {quant}")
                    getattr(copy, f"{factor}_codes")[g] = result.packed_codes()
                    getattr(copy, f"{factor}_scales")[g] = result.scales
                    if result.zero_points is not None:
                        getattr(copy, f"{factor}_zero_points")[g] = result.zero_points
            if spec.sparse_rows:
                copy.sparse_rows.copy_(self.sparse_rows)
                copy.sparse_values.copy_(self.sparse_values)
        return copy


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

    def hidden_activations(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """Group `group`'s hidden activations [n, I] on block inputs x [n, H]: the input of its output
        projection (down, or wo), as the forward computes them."""
        act = _activation(self.layout.activation)
        projections = self.projections
        if self.layout.gated:
            return act(projections["gate"](x, group)) * projections["up"](x, group)
        return act(projections["wi"](x, group))

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
            + (f" shared {p.spec.shared}" if p.spec.shared else "")
            + (f" {p.spec.quant.name}/{p.spec.quant.block}" if p.spec.quant else "")
            for n, p in self.projections.items()
        )
        return f"experts={self.num_experts}, groups={self.num_groups}, {specs}"
