"""What fixes one `ai.mcsmoe::GroupedLowRankMoE` node: its structure, sizes and routing (MoEOpSpec).

Shared by the node and its ONNX function body (moe_op, moe_body) and by the torch custom
op that stands for the node while tracing (custom_op).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..contract import op_version
from ..grouped_experts import GroupedLowRankExperts, ProjectionSpec
from ..models.base import ROUTINGS, SOFTMAX_TOPK_NORM, ExpertLayout

# Hugging Face activation names -> the op's canonical `activation` attribute
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


@dataclass(frozen=True)
class MoEOpSpec:
    """Everything that fixes one GroupedLowRankMoE node's inputs and semantics.

    projections: (name, ProjectionSpec) in layout order (gate, up, down or wi, wo);
    a ProjectionSpec with rank None is dense, else rank r plus `sparse_rows` rows.
    """

    num_experts: int
    num_groups: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    gated: bool
    activation: str
    routing: str
    projections: tuple[tuple[str, ProjectionSpec], ...]
    # version 3 layout (docs/ops.md): float factors per group, transposed to [in, out] (target ort)
    per_group: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not supported; one of {sorted(ACTIVATIONS)}")
        # store the canonical name so equal semantics give equal specs
        object.__setattr__(self, "activation", ACTIVATIONS[self.activation])
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing {self.routing!r} not supported; one of {ROUTINGS}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} outside 1..{self.num_experts}")
        layout = self.layout
        names = tuple(name for name, _ in self.projections)
        if names != layout.projections:
            raise ValueError(f"projections {names} != layout order {layout.projections}")
        for name, proj in self.projections:
            shape = (proj.out_features, proj.in_features)
            if shape != layout.projection_shape(name):
                raise ValueError(f"projection {name}: [out, in] {shape} != {layout.projection_shape(name)}")

    @property
    def layout(self) -> ExpertLayout:
        return ExpertLayout(self.gated, self.activation, self.hidden_size, self.intermediate_size)

    @property
    def normalize_topk(self) -> bool:
        return self.routing == SOFTMAX_TOPK_NORM

    @classmethod
    def from_experts(cls, experts: GroupedLowRankExperts, top_k: int, routing: str) -> MoEOpSpec:
        """The spec of a reference module (routing comes from the family's config)."""
        layout = experts.layout
        return cls(
            num_experts=experts.num_experts,
            num_groups=experts.num_groups,
            hidden_size=layout.hidden_size,
            intermediate_size=layout.intermediate_size,
            top_k=top_k,
            gated=layout.gated,
            activation=layout.activation,
            routing=routing,
            projections=tuple((name, experts.projections[name].spec) for name in layout.projections),
        )

    @property
    def split_floats(self) -> bool:
        """True when float factors are per-group inputs (version 3, `per_group` and some float projection)."""
        return self.per_group and any(p.quant is None for _, p in self.projections)

    @property
    def shared_basis(self) -> bool:
        """True when some projection has a factor shared by all groups (op version 3, docs/ops.md)."""
        return any(p.shared is not None for _, p in self.projections)

    @property
    def shared_base(self) -> bool:
        """True when some projection adds a full-rank base shared by all groups (op version 4, docs/ops.md)."""
        return any(p.has_base for _, p in self.projections)

    @property
    def version(self) -> int:
        """The op version this node needs (contract.op_version)."""
        return op_version(self.quantized, self.split_floats or self.shared_basis, self.shared_base)

    @property
    def quantized(self) -> bool:
        """True when some projection stores quantized factors (op version 2 inputs, docs/ops.md)."""
        return any(p.quant is not None for _, p in self.projections)

    def projection_inputs(self, name: str) -> tuple[str, ...]:
        """Input names of projection `name`, in node order ("gate_left", "gate_right", ...).

        A quantized projection takes each factor per group, transposed to [cols, rows] so that
        DequantizeLinear(axis=0) feeds MatMul directly: `{name}_{factor}_q_{g}`,
        `{name}_{factor}_scale_{g}` [, `{name}_{factor}_zero_point_{g}`] for every group g, factor
        by factor; then the stacked sparse rows as for a float projection.
        """
        proj = dict(self.projections)[name]
        sparse = (f"{name}_sparse_rows", f"{name}_sparse_values") if proj.sparse_rows else ()
        if proj.quant is None and self.per_group:  # version 3: `{name}_{factor}_{g}` [in, out]
            return tuple(f"{name}_{factor}_{g}" for factor in proj.factors for g in range(self.num_groups)) + sparse
        if proj.quant is None:
            return tuple(f"{name}_{tensor}" for tensor in proj.tensor_names)
        parts = ("q", "scale") + (() if proj.quant.symmetric else ("zero_point",))
        names = tuple(f"{name}_{factor}_{part}_{g}" for factor in proj.factors
                      for g in range(self.num_groups) for part in parts)
        return names + sparse

    def traced_projection_inputs(self, name: str) -> tuple[str, ...]:
        """The stacked stored tensors of projection `name` as the traced torch op passes them
        (quantized: codes, scales[, zero points] [G, ...]); `projection_inputs` for float ones."""
        return tuple(f"{name}_{tensor}" for tensor in dict(self.projections)[name].tensor_names)

    def split_projection_tensors(
        self, tensors: Sequence[torch.Tensor]
    ) -> dict[str, tuple[ProjectionSpec, Sequence[torch.Tensor]]]:
        """The node's projection inputs (everything after expert_to_group, flat, in node order) per
        projection: {name: (ProjectionSpec, its tensors)}."""
        per_projection, offset = {}, 0
        for name, proj in self.projections:
            count = len(proj.tensor_names)
            per_projection[name] = (proj, tensors[offset : offset + count])
            offset += count
        if offset != len(tensors):
            raise ValueError(f"{len(tensors)} projection tensors given, the op takes {offset}")
        return per_projection

    def input_names(self) -> tuple[str, ...]:
        """All node inputs in order (the function's formal input names)."""
        names = ("hidden", "router_logits", "expert_to_group")
        for name, _ in self.projections:
            names += self.projection_inputs(name)
        return names

    def input_shapes(self) -> dict[str, list[int | str]]:
        """Shape of every input, with "T" the token count."""
        shapes: dict[str, list[int | str]] = {
            "hidden": ["T", self.hidden_size],
            "router_logits": ["T", self.num_experts],
            "expert_to_group": [self.num_experts],
        }
        g = self.num_groups
        if self.quantized:
            raise ValueError("input_shapes lists float stacked inputs; quantized inputs are per group (docs/ops.md)")
        for name, p in self.projections:
            out_f, in_f = p.out_features, p.in_features
            if self.per_group:
                for factor in p.factors:
                    rows, cols = p.factor_shape(factor)
                    shapes.update({f"{name}_{factor}_{i}": [cols, rows] for i in range(g)})
                if p.sparse_rows:
                    shapes[f"{name}_sparse_rows"] = [g, p.sparse_rows]
                    shapes[f"{name}_sparse_values"] = [g, p.sparse_rows, in_f]
                continue
            if p.dense:
                shapes[f"{name}_weight"] = [g, out_f, in_f]
                continue
            shapes[f"{name}_left"] = [out_f, p.rank] if p.shared == "left" else [g, out_f, p.rank]
            shapes[f"{name}_right"] = [p.rank, in_f] if p.shared == "right" else [g, p.rank, in_f]
            if p.has_base:
                shapes[f"{name}_base"] = [out_f, in_f]
            if p.sparse_rows:
                shapes[f"{name}_sparse_rows"] = [g, p.sparse_rows]
                shapes[f"{name}_sparse_values"] = [g, p.sparse_rows, in_f]
        return shapes

    @property
    def overload(self) -> str:
        """Names the function body: what changes the graph (the structure, and G: the body is
        unrolled over groups), not the sizes H, I, E, ranks or row counts."""
        kinds = []
        for name, p in self.projections:
            kind = f"{name}-dense" if p.dense else f"{name}-lowrank" + ("-sparse" if p.sparse_rows else "")
            if p.shared is not None:  # the body reads the shared factor as it is, without a group slice
                kind += f"-shared{p.shared}"
            if p.quant is not None:  # the body's DequantizeLinear carries the block size and the zero points
                kind += f"-{'' if p.quant.symmetric else 'u'}int{p.quant.bits}b{p.quant.block}"
            kinds.append(kind)
        norm = "norm" if self.normalize_topk else "raw"
        if self.split_floats:  # version 3 inputs: another body
            kinds.append("pergroup")
        family = "gated" if self.gated else "plain"
        return "_".join([family, self.activation, f"k{self.top_k}", norm, f"g{self.num_groups}"] + kinds)
