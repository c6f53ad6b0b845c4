"""What every architecture adapter answers: where the MoE layers are and how to read and write them.

Expert weights travel between stages as plain per-expert dictionaries
`{projection name: Tensor [out_features, in_features]}` (the nn.Linear
convention), whatever the family stores internally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..contract import KVGeometry

ExpertWeights = dict[str, torch.Tensor]

# the routings the GroupedLowRankMoE op implements (its `normalize_topk` attribute tells them apart)
SOFTMAX_TOPK = "softmax_topk"  # softmax over the E logits, the k largest probabilities as weights
SOFTMAX_TOPK_NORM = "softmax_topk_norm"  # the same, the k weights then divided by their sum
ROUTINGS = (SOFTMAX_TOPK, SOFTMAX_TOPK_NORM)


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


@dataclass(frozen=True)
class Routing:
    """How a family's router picks experts from its E logits: softmax, then the `top_k` largest.

    renormalize: the k weights are divided by their sum (Mixtral always; Qwen and OLMoE when
    the config's `norm_topk_prob` says so).
    """

    top_k: int
    renormalize: bool

    @property
    def name(self) -> str:
        """The GroupedLowRankMoE op's name of this routing (one of ROUTINGS)."""
        return SOFTMAX_TOPK_NORM if self.renormalize else SOFTMAX_TOPK


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
    # whether exporters/torch_export writes this family as one decoder graph; when not, why
    exportable: bool = False
    not_exportable_because: str = "no ONNX export is written for this family yet"
    # the config attribute holding the number of experts, where a standard (plain transformers)
    # checkpoint with fewer experts can be written for the family; None where it cannot
    num_experts_key: str | None = None

    def num_experts(self, config) -> int:
        raise NotImplementedError

    def top_k(self, config) -> int:
        """Experts each token is routed to in one MoE block."""
        raise NotImplementedError

    def renormalizes_top_k(self, config) -> bool:
        """Whether the router divides a token's k routing weights by their sum."""
        raise NotImplementedError

    def routing(self, config) -> Routing:
        """The router's top-k and renormalisation, as the GroupedLowRankMoE op needs them."""
        return Routing(self.top_k(config), self.renormalizes_top_k(config))

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

    def read_experts(self, block: nn.Module, copies: bool = True) -> list[ExpertWeights]:
        """The block's experts as per-expert weights: float32 copies, or with `copies=False` views of the
        block's own tensors in their own dtype (no memory; read them, never write them)."""
        raise NotImplementedError

    def expert_output(self, block: nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        """What expert `expert` of the block (dense, before any compression) computes for hidden [T, H]:
        [T, H], unweighted by routing."""
        raise NotImplementedError

    def keep_router_rows(self, block: nn.Module, rows: Sequence[int]) -> None:
        """Shrink the block's router, in place, to the rows (experts) `rows`, in that order: the router
        then scores len(rows) experts, and softmax and top-k run over those alone (meta tensors work)."""
        raise NotImplementedError

    def write_standard_experts(self, block: nn.Module, experts: Sequence[ExpertWeights], router_weight: torch.Tensor) -> None:
        """Give a block of a plain (uncompressed) model of this family len(experts) experts and the
        router weight [len(experts), H], in the family's own layout (standard checkpoints)."""
        raise NotImplementedError

    def install_experts(self, block: nn.Module, experts: nn.Module) -> None:
        """Replace the block's experts with `experts` (a GroupedLowRankExperts)."""
        block.experts = experts

    def shared_expert_output(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        """What the block adds to the routed experts' output for hidden [T, H]: [T, H], or None
        for a family without a shared expert (the block's output is the routed experts' alone)."""
        return None

    # ---- what decoding one token reads, per checkpoint tensor (runtime/active_bytes.py)

    def is_expert_tensor(self, tensor_name: str) -> bool:
        """Whether a checkpoint tensor holds routed experts' weights (a shared expert's do not)."""
        return ".experts." in tensor_name

    def experts_in_tensor(self, tensor_name: str, shape: Sequence[int], config) -> int:
        """How many experts (or merged groups) one stored expert tensor of this family serves."""
        if ".experts.projections." in tensor_name:  # GroupedLowRankExperts: tensors stacked over G groups
            if tensor_name.endswith((".left", ".right", ".base")) and len(shape) == 2:
                return 1  # a shared basis or base (no group axis): every token reads all of it
            return max(shape[0], 1)
        return self.num_experts(config)

    def token_read_share(self, tensor_name: str, shape: Sequence[int], config) -> float:
        """Share of a checkpoint tensor [shape] that decoding one token (batch 1) reads, in [0, 1].

        Expert tensors: min(k, n) / n of the n experts or groups they serve (two picks in one
        merged group read it once, so an upper bound); an input embedding not tied to the
        output projection: one row; anything else: all of it.
        """
        if self.is_expert_tensor(tensor_name):
            served = self.experts_in_tensor(tensor_name, shape, config)
            return min(self.top_k(config), served) / served
        if "embed_tokens" in tensor_name and not getattr(config, "tie_word_embeddings", False):
            return 1 / max(shape[0], 1)
        return 1.0
