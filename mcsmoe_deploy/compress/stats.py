"""Routing statistics on calibration text, streamed.

For each MoE layer: how often each expert is picked (share of all top-k
assignments) and the E x E Gram matrix of router-logit columns summed over
tokens, from which the cosine similarity of experts follows. Asked for, the same
pass also runs every expert on every calibration token and sums its outputs (for
HC-SMoE's output similarity) and, over the tokens routed to it, its router weight x
output L2 norm (REAP's saliency). Nothing grows with the number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import FamilyAdapter, Routing
from ..models.fp32_compute import computed_in_fp32
from .registry import Registry


@dataclass
class LayerRoutingStats:
    """Routing statistics of one MoE layer.

    assignment_counts [E]: top-k picks of each expert (float64).
    logit_gram [E, E]: sum over tokens of logits^T logits (float64).
    router_weight [E, H]: the router's weight rows, for weight similarity.
    sample_inputs [n, H], sample_assigned [n, k]: the block's inputs and the experts
        they were routed to, for the first n calibration tokens (n = 0 unless asked for);
        activation-aware compression fits each merged expert to them.
    sample_logits [n, E]: the router's logits of the same tokens (float64; the output refit
        routes them as the compressed model will).
    output_sum [E, H]: sum over all calibration tokens of each expert's output (float64; None
        unless expert outputs were asked for).
    saliency_sum [E]: sum over the tokens routed to each expert of its routing weight x the L2 norm
        of its output (float64; None unless asked for).
    """

    name: str
    assignment_counts: torch.Tensor
    logit_gram: torch.Tensor
    router_weight: torch.Tensor
    sample_inputs: list[torch.Tensor] = field(default_factory=list, repr=False)
    sample_assigned: list[torch.Tensor] = field(default_factory=list, repr=False)
    sample_logits: list[torch.Tensor] = field(default_factory=list, repr=False)
    tokens: int = 0
    output_sum: torch.Tensor | None = field(default=None, repr=False)
    saliency_sum: torch.Tensor | None = field(default=None, repr=False)

    def _expert_outputs(self, what: str) -> torch.Tensor:
        if self.output_sum is None or self.saliency_sum is None:
            raise ValueError(f"{what} needs expert outputs: collect_routing_stats(..., expert_outputs=True)")
        return self.output_sum if what == "mean output" else self.saliency_sum

    @property
    def mean_output(self) -> torch.Tensor:
        """Each expert's output averaged over every calibration token [E, H] (float64)."""
        return self._expert_outputs("mean output") / max(self.tokens, 1)

    @property
    def saliency(self) -> torch.Tensor:
        """REAP saliency [E] (float64): mean over the tokens routed to each expert of routing weight x
        output L2 norm; 0 for an expert no token was routed to."""
        return self._expert_outputs("saliency") / self.assignment_counts.clamp(min=1)

    def samples(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(inputs [n, H], assigned experts [n, k]) kept during the pass (the first `limit` of them), or None."""
        if not self.sample_inputs or limit == 0:
            return None
        return torch.cat(self.sample_inputs)[:limit], torch.cat(self.sample_assigned)[:limit]

    def samples_with_logits(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(inputs [n, H], router logits [n, E], assigned experts [n, k]) kept during the pass (the first
        `limit` of them), or None."""
        if not self.sample_inputs or limit == 0:
            return None
        return (torch.cat(self.sample_inputs)[:limit], torch.cat(self.sample_logits)[:limit],
                torch.cat(self.sample_assigned)[:limit])

    @property
    def frequency(self) -> torch.Tensor:
        """Activation frequency f_e [E]: share of the layer's top-k assignments (sums to 1)."""
        total = self.assignment_counts.sum()
        if total == 0:
            return torch.zeros_like(self.assignment_counts)
        return self.assignment_counts / total

    def similarity(self, kind: str = "router-logits") -> torch.Tensor:
        """Cosine similarity of experts [E, E] from the Gram matrix that SIMILARITIES[kind] gives."""
        gram = SIMILARITIES.lookup(kind)(self)
        norms = gram.diagonal().clamp(min=1e-30).sqrt()
        return gram / norms[:, None] / norms[None, :]


# similarity name -> the layer's E x E Gram matrix (float64) whose cosine is the experts' similarity
SIMILARITIES: Registry[Callable[[LayerRoutingStats], torch.Tensor]] = Registry("similarity")
register_similarity = SIMILARITIES.register


@register_similarity("router-logits")
def router_logit_gram(layer: LayerRoutingStats) -> torch.Tensor:
    """Inner products of router-logit columns over the calibration tokens (M-SMoE's default)."""
    return layer.logit_gram


@register_similarity("router-weights")
def router_weight_gram(layer: LayerRoutingStats) -> torch.Tensor:
    """Inner products of the router's weight rows (no calibration text needed)."""
    weight = layer.router_weight.double()
    return weight @ weight.T


@dataclass
class RoutingStats:
    """Routing statistics of every MoE layer, from one pass over `tokens` calibration tokens."""

    layers: list[LayerRoutingStats]
    tokens: int


def forward_inputs(model: nn.Module, adapter: FamilyAdapter, batch: torch.Tensor) -> dict:
    """Keyword inputs that run `model` on token blocks [B, S] (teacher-forced for encoder-decoders)."""
    if adapter.encoder_decoder:
        return {"input_ids": batch, "decoder_input_ids": model._shift_right(batch)}
    return {"input_ids": batch}


def routing_weights(logits: torch.Tensor, assigned: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Each pick's routing weight [T, k] (0 where no expert was assigned): the softmax probability of
    the picked expert, divided by the sum over the token's picks when the family renormalises."""
    probs = torch.softmax(logits.double(), dim=-1)
    valid = assigned >= 0
    weights = torch.where(valid, probs.gather(1, assigned.clamp(min=0)), torch.zeros((), dtype=probs.dtype))
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    return weights


def accumulate_expert_outputs(
    layer_stats: LayerRoutingStats,
    adapter: FamilyAdapter,
    block: nn.Module,
    hidden: torch.Tensor,
    logits: torch.Tensor,
    assigned: torch.Tensor,
    routing: Routing,
) -> None:
    """Add one batch to `output_sum` and `saliency_sum`: hidden [T, H] (the block's input), logits [T, E],
    assigned [T, k] (-1: none). One expert at a time, so memory stays O(T x H)."""
    weights = routing_weights(logits, assigned.to(logits.device), routing)
    for expert in range(layer_stats.assignment_counts.numel()):
        out = adapter.expert_output(block, expert, hidden).double()  # [T, H]
        layer_stats.output_sum[expert] += out.sum(dim=0).cpu()
        gate = (weights * (assigned.to(weights.device) == expert)).sum(dim=-1)  # [T]: 0 unless routed to expert
        layer_stats.saliency_sum[expert] += float((gate * out.norm(dim=-1)).sum())


@torch.no_grad()
def collect_routing_stats(
    model: nn.Module,
    adapter: FamilyAdapter,
    blocks: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    keep_inputs: int = 0,
    expert_outputs: bool = False,
) -> RoutingStats:
    """One pass over calibration blocks [N, S], recording every MoE layer's routing.

    keep_inputs: also keep each layer's first `keep_inputs` input vectors and
    their routing (for activation-aware compression); 0 keeps none.
    expert_outputs: also run every expert on every token of the block (E expert evaluations per
    token instead of k) and accumulate `output_sum` and `saliency_sum` (HC-SMoE and REAP).

    A model held in bf16 or fp16 computes in fp32 one layer at a time (models.fp32_compute): the
    statistics are those of the fp32 model. Hooks read each router's input and output, so what is counted is exactly
    what the model routes (Switch Transformers' capacity drops included); the
    router's input is also the input of every expert of the block.
    """
    layers = adapter.moe_layers(model)
    num_experts = adapter.num_experts(model.config)
    hidden = adapter.expert_layout(model.config).hidden_size
    stats = [
        LayerRoutingStats(
            name=layer.name,
            assignment_counts=torch.zeros(num_experts, dtype=torch.float64),
            logit_gram=torch.zeros(num_experts, num_experts, dtype=torch.float64),
            router_weight=adapter.router_weight(layer.block).detach().float().cpu(),
            output_sum=torch.zeros(num_experts, hidden, dtype=torch.float64) if expert_outputs else None,
            saliency_sum=torch.zeros(num_experts, dtype=torch.float64) if expert_outputs else None,
        )
        for layer in layers
    ]
    routing = adapter.routing(model.config)

    def make_hook(layer_stats: LayerRoutingStats, block: nn.Module):
        def hook(_module, inputs, output):
            logits, assigned = adapter.routing_from_router_output(output)
            wanted = keep_inputs - sum(len(x) for x in layer_stats.sample_inputs)
            if wanted > 0:
                layer_stats.sample_inputs.append(inputs[0].detach().reshape(-1, hidden)[:wanted].float().cpu())
                layer_stats.sample_assigned.append(assigned[:wanted].cpu())
            logits = logits.detach().double()
            if wanted > 0:
                layer_stats.sample_logits.append(logits[:wanted].cpu())
            layer_stats.logit_gram += (logits.T @ logits).cpu()
            picked = assigned[assigned >= 0].reshape(-1).cpu()
            layer_stats.assignment_counts += torch.bincount(picked, minlength=num_experts).double()
            layer_stats.tokens += logits.shape[0]
            if expert_outputs:
                hidden_states = inputs[0].detach().reshape(-1, hidden)
                accumulate_expert_outputs(layer_stats, adapter, block, hidden_states, logits, assigned, routing)

        return hook

    handles = [adapter.router(layer.block).register_forward_hook(make_hook(s, layer.block))
               for layer, s in zip(layers, stats)]
    device = next(model.parameters()).device
    try:
        model.eval()
        with computed_in_fp32(model):  # a model held in bf16 computes as the fp32 one does, a layer at a time
            for start in tqdm(range(0, len(blocks), batch_size), desc="routing statistics", unit="batch",
                              disable=not progress):
                batch = blocks[start : start + batch_size].to(device)
                model(**forward_inputs(model, adapter, batch))
    finally:
        for handle in handles:
            handle.remove()
    return RoutingStats(layers=stats, tokens=int(blocks.numel()))
