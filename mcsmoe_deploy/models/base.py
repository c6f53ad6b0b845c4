"""What every architecture adapter answers: where the MoE layers are and how to read and write them.

Expert weights travel between stages as plain per-expert dictionaries
`{projection name: Tensor [out_features, in_features]}` (the nn.Linear
convention), whatever the family stores internally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..contract import KVGeometry

ExpertWeights = dict[str, torch.Tensor]


def dispatch_to_index(dispatch: torch.Tensor) -> torch.Tensor:
    """A one-hot dispatch mask [..., E] (Switch Transformers) -> the assigned expert [T, 1], -1 where none.

    The router zeroes the mask of tokens over an expert's capacity: those get no expert.
    """
    dispatch = dispatch.reshape(-1, dispatch.shape[-1])
    assigned = dispatch.argmax(dim=-1, keepdim=True)
    return torch.where(dispatch.sum(dim=-1, keepdim=True) > 0, assigned, -1)


@dataclass(frozen=True)
class ExpertLayout:
    """The shape of one expert's feed-forward network.

    gated: SwiGLU-style `act(gate(x)) * up(x)` then `down`; otherwise `act(wi(x))` then `wo`.
    input_projections: projections whose rows are the expert's hidden neurons.
    output_projections: projections whose columns are the expert's hidden neurons.
    """

    gated: bool
    activation: str
    hidden_size: int
    intermediate_size: int

    @property
    def input_projections(self) -> tuple[str, ...]:
        return ("gate", "up") if self.gated else ("wi",)

    @property
    def output_projections(self) -> tuple[str, ...]:
        return ("down",) if self.gated else ("wo",)

    @property
    def projections(self) -> tuple[str, ...]:
        return self.input_projections + self.output_projections

    def projection_shape(self, name: str) -> tuple[int, int]:
        """[out_features, in_features] of projection `name`."""
        if name in self.input_projections:
            return (self.intermediate_size, self.hidden_size)
        return (self.hidden_size, self.intermediate_size)


@dataclass
class MoELayer:
    """One MoE block found in a model: its module path and the module itself."""

    index: int
    name: str
    block: nn.Module


class FamilyAdapter:
    """Base class of the per-family adapters (see models/families.py)."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    encoder_decoder: bool = False
    # experts are called with a one-hot dispatch mask [T, 1, E] instead of top-k indices
    one_hot_dispatch: bool = False

    def num_experts(self, config) -> int:
        raise NotImplementedError

    def top_k(self, config) -> int:
        raise NotImplementedError

    def expert_layout(self, config) -> ExpertLayout:
        raise NotImplementedError

    def kv_geometry(self, config) -> KVGeometry:
        """The decoder's KV cache: layers, key/value heads, head size."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return KVGeometry(config.num_hidden_layers, kv_heads, head_dim)

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """All MoE blocks of `model`, in module order."""
        layers = []
        for name, module in model.named_modules():
            if self.is_moe_block(module):
                layers.append(MoELayer(index=len(layers), name=name, block=module))
        return layers

    def is_moe_block(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def router(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        """Router weight [E, H]: row e scores expert e."""
        raise NotImplementedError

    def routing_from_router_output(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        """(router logits [T, E], assigned experts [T, k], -1 where a token got no expert)."""
        raise NotImplementedError

    def read_experts(self, block: nn.Module) -> list[ExpertWeights]:
        """The block's experts as per-expert weights, float32 copies."""
        raise NotImplementedError

    def install_experts(self, block: nn.Module, experts: nn.Module) -> None:
        """Replace the block's experts with `experts` (a GroupedLowRankExperts)."""
        block.experts = experts
