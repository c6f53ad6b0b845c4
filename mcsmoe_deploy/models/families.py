"""One adapter per supported family.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE
stacked (`gate_up_proj [E, 2I, H]` with gate first, `down_proj [E, H, I]`) and
routes with a `gate` module returning (logits, top-k weights, top-k indices).
Switch Transformers keeps per-expert `wi`/`wo` Linear layers and a top-1
router returning (one-hot dispatch mask with capacity applied, probability,
logits). Qwen2-MoE's shared expert is not touched: it stays dense in the block.

Routing (transformers 5.24 `*TopKRouter.forward`): all five take a softmax over the E
logits and the top-k probabilities; Mixtral always divides the k weights by their sum,
Qwen2-MoE, Qwen3-MoE and OLMoE only when `config.norm_topk_prob`; Switch's top-1 weight
is the probability itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import KVGeometry
from .base import ExpertLayout, ExpertWeights, FamilyAdapter, dispatch_to_index


class StackedExpertsAdapter(FamilyAdapter):
    """Families whose experts are stacked `gate_up_proj` / `down_proj` tensors."""

    block_class_suffix = "SparseMoeBlock"
    intermediate_attr = "intermediate_size"
    exportable = True
    not_exportable_because = ""
    num_experts_key = "num_experts"

    def num_experts(self, config) -> int:
        return config.num_experts

    def top_k(self, config) -> int:
        return config.num_experts_per_tok

    def renormalizes_top_k(self, config) -> bool:
        return bool(getattr(config, "norm_topk_prob", False))

    def expert_layout(self, config) -> ExpertLayout:
        return ExpertLayout(
            gated=True,
            activation=config.hidden_act,
            hidden_size=config.hidden_size,
            intermediate_size=getattr(config, self.intermediate_attr),
        )

    def is_moe_block(self, module: nn.Module) -> bool:
        return type(module).__name__.endswith(self.block_class_suffix) and hasattr(module, "gate")

    def router(self, block: nn.Module) -> nn.Module:
        return block.gate

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        return block.gate.weight

    def routing_from_router_output(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _, indices = output
        return logits.reshape(-1, logits.shape[-1]), indices.reshape(-1, indices.shape[-1])

    def read_experts(self, block: nn.Module, copies: bool = True) -> list[ExpertWeights]:
        gate_up = block.experts.gate_up_proj.detach()
        down = block.experts.down_proj.detach()
        intermediate = gate_up.shape[1] // 2
        own = (lambda tensor: tensor.float().clone()) if copies else (lambda tensor: tensor)
        return [
            {"gate": own(gate_up[e, :intermediate]), "up": own(gate_up[e, intermediate:]), "down": own(down[e])}
            for e in range(gate_up.shape[0])
        ]

    def expert_output(self, block: nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        experts = block.experts
        gate, up = F.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(experts.act_fn(gate) * up, experts.down_proj[expert])

    def write_standard_experts(self, block: nn.Module, experts, router_weight: torch.Tensor) -> None:
        dtype = router_weight.dtype
        stacked = block.experts
        stacked.gate_up_proj = nn.Parameter(torch.stack([torch.cat([e["gate"], e["up"]]) for e in experts]).to(dtype))
        stacked.down_proj = nn.Parameter(torch.stack([e["down"] for e in experts]).to(dtype))
        stacked.num_experts = len(experts)
        block.gate.weight = nn.Parameter(router_weight.detach().clone())
        block.gate.num_experts = len(experts)

    def keep_router_rows(self, block: nn.Module, rows) -> None:
        gate = block.gate
        gate.weight = nn.Parameter(gate.weight.detach()[list(rows)].clone(), requires_grad=gate.weight.requires_grad)
        if getattr(gate, "bias", None) is not None:
            gate.bias = nn.Parameter(gate.bias.detach()[list(rows)].clone(), requires_grad=gate.bias.requires_grad)
        gate.num_experts = len(rows)


class MixtralAdapter(StackedExpertsAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    num_experts_key = "num_local_experts"

    def num_experts(self, config) -> int:
        return config.num_local_experts

    def renormalizes_top_k(self, config) -> bool:
        return True  # MixtralTopKRouter has no norm_topk_prob switch


class Qwen2MoeAdapter(StackedExpertsAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    intermediate_attr = "moe_intermediate_size"

    def shared_expert_output(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The dense shared expert, scaled by its sigmoid gate (Qwen2MoeSparseMoeBlock.forward)."""
        return F.sigmoid(block.shared_expert_gate(hidden)) * block.shared_expert(hidden)


class Qwen3MoeAdapter(StackedExpertsAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    intermediate_attr = "moe_intermediate_size"


class OlmoeAdapter(StackedExpertsAdapter):
    family = "olmoe"
    model_types = ("olmoe",)


class SwitchTransformersAdapter(FamilyAdapter):
    family = "switch_transformers"
    model_types = ("switch_transformers",)
    encoder_decoder = True
    one_hot_dispatch = True
    not_exportable_because = (
        "an encoder-decoder model with expert capacity: it exports as encoder.onnx + decoder.onnx "
        "through exporters/switch_export, not as one decoder graph"
    )

    def num_experts(self, config) -> int:
        return config.num_experts

    def top_k(self, config) -> int:
        return 1

    def renormalizes_top_k(self, config) -> bool:
        return False  # the top-1 weight is the softmax probability itself

    def expert_layout(self, config) -> ExpertLayout:
        return ExpertLayout(
            gated=False,
            activation=config.dense_act_fn,
            hidden_size=config.d_model,
            intermediate_size=config.d_ff,
        )

    def kv_geometry(self, config) -> KVGeometry:
        """The decoder's self-attention cache (the cross-attention cache has the same heads and size)."""
        return KVGeometry(config.num_decoder_layers, config.num_heads, config.d_kv)

    def is_moe_block(self, module: nn.Module) -> bool:
        return type(module).__name__ == "SwitchTransformersSparseMLP"

    def router(self, block: nn.Module) -> nn.Module:
        return block.router

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        return block.router.classifier.weight

    def routing_from_router_output(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        dispatch, _, logits = output
        return logits.reshape(-1, logits.shape[-1]), dispatch_to_index(dispatch)

    def expert_output(self, block: nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        return block.experts[f"expert_{expert}"](hidden)

    def keep_router_rows(self, block: nn.Module, rows) -> None:
        router = block.router
        classifier = router.classifier
        kept = nn.Linear(classifier.in_features, len(rows), bias=classifier.bias is not None,
                         device=classifier.weight.device, dtype=classifier.weight.dtype)
        kept.weight = nn.Parameter(classifier.weight.detach()[list(rows)].clone())
        if classifier.bias is not None:
            kept.bias = nn.Parameter(classifier.bias.detach()[list(rows)].clone())
        router.classifier = kept
        router.num_experts = len(rows)  # its one-hot dispatch and capacity count these

    def read_experts(self, block: nn.Module, copies: bool = True) -> list[ExpertWeights]:
        experts = block.experts
        own = (lambda tensor: tensor.float().clone()) if copies else (lambda tensor: tensor)
        return [
            {"wi": own(experts[f"expert_{e}"].wi.weight.detach()), "wo": own(experts[f"expert_{e}"].wo.weight.detach())}
            for e in range(experts.num_experts)
        ]


ADAPTERS: tuple[FamilyAdapter, ...] = (
    MixtralAdapter(),
    Qwen2MoeAdapter(),
    Qwen3MoeAdapter(),
    OlmoeAdapter(),
    SwitchTransformersAdapter(),
)
