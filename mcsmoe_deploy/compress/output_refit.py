"""Output-aware refit of the merged (or kept) experts' output projections, in closed form.

Merging and pruning choose the G experts' weights from the weights alone. Given the block's inputs
on calibration tokens, the compressed block's output is linear in the output projections once the
input projections are fixed: for token x routed with weight a_g(x) to group g (picks in one group
add, as the GroupedLowRankMoE op adds them),

    compressed(x) = sum_g a_g(x) D_g h_g(x),   h_g(x) = act(gate_g x) * (up_g x)   (or act(wi_g x))

so the D_g [H, F] that best reproduce the dense block's output y(x) = sum over the dense picks of
w_e(x) E_e(x) solve one least-squares problem with G*F unknowns per output coordinate. With
z(x) = [a_1 h_1(x), ..., a_G h_G(x)] [G*F] and D = [D_1 ... D_G] [H, G*F]:

    min_D  sum_x |y(x) - D z(x)|^2 + lambda |D - D0|^2,   D0: the merged output projections

whose normal equations (Z^T Z + lambda I) D^T = Z^T Y + lambda D0^T are accumulated in float64. The
ridge pulls towards today's merged weights, not towards 0, so where the merged block already
reproduces the dense one (one expert per group) the refit returns D0 exactly, whatever lambda; lambda
is `ridge` times the mean diagonal of Z^T Z. The router, the input projections and the checkpoint
format do not change; only the output projections' values do.

Routing is the one the compressed model uses: the dense router's picks where no expert was removed
(our format keeps all E router rows), otherwise softmax and top-k over the kept rows' logits. Switch
Transformers' capacity drops are taken from the dense pass and not re-simulated after pruning.

Memory: the Gram matrix is (G*F)^2 float64 numbers per layer (G = 4, F = 144: 2.6 MB; Mixtral-8x7B
at G = 4, F = 14336: 26 GB, refused by `check_refit_size`; such models need a per-group solve, not written).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ParameterError
from ..grouped_experts import _activation, _group_weights, route_top_k
from ..models import ExpertLayout, ExpertWeights, Routing
from .stats import routing_weights

# the largest Gram matrix the refit builds per layer, in bytes (float64): beyond it the check refuses up front
MAX_GRAM_BYTES = 4 << 30
# tokens per chunk while accumulating the normal equations: bounds the [chunk, G*F] feature matrix
CHUNK_TOKENS = 1024


def check_refit_size(num_groups: int, intermediate_size: int) -> None:
    """ParameterError (naming output_refit) when one layer's Gram matrix of (G*F)^2 float64 numbers
    exceeds MAX_GRAM_BYTES; checked before the statistics pass."""
    size = (num_groups * intermediate_size) ** 2 * 8
    if size > MAX_GRAM_BYTES:
        raise ParameterError("output_refit", f"would solve for {num_groups} x {intermediate_size} hidden neurons "
                                             f"per layer at once ({size / 2**30:.0f} GiB); it is for models whose "
                                             f"G x intermediate size is at most {int((MAX_GRAM_BYTES / 8) ** 0.5)}")


def expert_hidden(expert: ExpertWeights, x: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """The expert's hidden activations [T, F] for inputs x [T, H] (what its output projection multiplies)."""
    act = _activation(layout.activation)
    first = layout.input_projections[0]
    hidden = act(x @ expert[first].to(x.dtype).T)
    if layout.gated:
        hidden = hidden * (x @ expert["up"].to(x.dtype).T)
    return hidden


def dense_block_output(
    experts: Sequence[ExpertWeights], x: torch.Tensor, assigned: torch.Tensor, weights: torch.Tensor,
    layout: ExpertLayout,
) -> torch.Tensor:
    """The routed experts' output [T, H] of the dense block for inputs x [T, H], picks assigned [T, k]
    (-1: none) with routing weights [T, k] (a shared expert, which compression leaves alone, excluded)."""
    out_name = layout.output_projections[0]
    output = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        pick_weight = (weights * (assigned == e)).sum(dim=-1)  # [T]
        tokens = pick_weight.nonzero().squeeze(-1)
        if tokens.numel():
            out = expert_hidden(expert, x[tokens], layout) @ expert[out_name].to(x.dtype).T
            output.index_add_(0, tokens, out * pick_weight[tokens, None])
    return output


def compressed_group_weights(
    logits: torch.Tensor, assigned: torch.Tensor, routing: Routing, expert_to_group: Sequence[int],
    router_rows: Sequence[int] | None,
) -> torch.Tensor:
    """Each token's routing weight per group [T, G] in the compressed model.

    logits [T, E], assigned [T, k]: the dense router's, from the statistics pass. expert_to_group:
    the group of each router row the compressed model keeps; router_rows: the kept rows (original
    indices), None when every row is kept (the dense picks then stand).
    """
    if router_rows is None:
        index, weights = assigned, routing_weights(logits, assigned, routing)
    else:
        kept = logits[:, list(router_rows)]
        index, weights = route_top_k(kept, min(routing.top_k, kept.shape[1]), routing.renormalize)
        index = torch.where((assigned >= 0).all(dim=-1, keepdim=True), index, -1)  # a dropped token stays dropped
    groups = torch.tensor(list(expert_to_group), dtype=torch.long)
    num_groups = int(groups.max()) + 1
    return _group_weights(groups, num_groups, index, weights.double())[0]


@torch.no_grad()
def refit_output_projections(
    dense_experts: Sequence[ExpertWeights],
    merged: list[ExpertWeights],
    samples: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    routing: Routing,
    expert_to_group: Sequence[int],
    router_rows: Sequence[int] | None,
    layout: ExpertLayout,
    ridge: float = 1e-2,
) -> list[ExpertWeights]:
    """`merged` with each output projection refitted (see the module docstring); the input is left alone.

    dense_experts: the layer's E dense experts; merged: its G compressed experts (fp32, before low rank);
    samples: (inputs [n, H], dense router logits [n, E], dense picks [n, k]) of calibration tokens;
    expert_to_group, router_rows: as `compressed_group_weights` takes them. ridge > 0: lambda relative
    to the mean diagonal of the Gram matrix.
    """
    inputs, logits, assigned = samples
    out_name = layout.output_projections[0]
    num_groups, width = len(merged), merged[0][out_name].shape[1]
    gram = torch.zeros(num_groups * width, num_groups * width, dtype=torch.float64)
    cross = torch.zeros(num_groups * width, inputs.shape[1], dtype=torch.float64)
    for start in range(0, len(inputs), CHUNK_TOKENS):
        x = inputs[start : start + CHUNK_TOKENS].double()
        chunk_logits, chunk_assigned = logits[start : start + CHUNK_TOKENS], assigned[start : start + CHUNK_TOKENS]
        target = dense_block_output(dense_experts, x, chunk_assigned,
                                    routing_weights(chunk_logits, chunk_assigned, routing), layout)
        group_weight = compressed_group_weights(chunk_logits, chunk_assigned, routing, expert_to_group, router_rows)
        features = torch.cat([group_weight[:, g, None] * expert_hidden(merged[g], x, layout)
                              for g in range(num_groups)], dim=1)  # [T, G*F]
        gram += features.T @ features
        cross += features.T @ target
    current = torch.cat([expert[out_name].double().T for expert in merged])  # D0^T [G*F, H]
    lam = ridge * float(gram.diagonal().mean().clamp(min=1e-30))
    system = gram + lam * torch.eye(len(gram), dtype=torch.float64)
    fitted = torch.linalg.solve(system, cross + lam * current)  # D^T [G*F, H]
    return [{**expert, out_name: fitted[g * width : (g + 1) * width].T.float().contiguous()}
            for g, expert in enumerate(merged)]
