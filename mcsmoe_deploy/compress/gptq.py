"""GPTQ: blockwise quantization with error feedback, fitted to the inputs a weight sees (Frantar et al. 2022).

Round to nearest minimises each weight's own error; what matters is the output error
||X W^T - X Ŵ^T||^2 = tr((W - Ŵ) H (W - Ŵ)^T) with H = X^T X, the second moment of the inputs.
GPTQ quantizes the columns (input channels) of W [out, in] one at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the upper Cholesky factor U of H^-1
(H damped by DAMP x its mean diagonal). Columns go in blocks of `spec.block`, the quantization
block: a block's grid (scales, zero points: quantization.block_grid) is fixed from its columns as
they stand when the block starts, i.e. after the error feedback of the blocks before it, as GPTQ
does with groups. Codes, scales and zero points are those of quantization.py, so `dequantize`, the
checkpoint and the exported graph compute exactly what they compute for round to nearest.

Exact property: with a diagonal H (uncorrelated inputs) U is diagonal, nothing is fed back and the
result is round to nearest, bit for bit. Otherwise GPTQ is greedy: it usually, not provably, lowers
the output error on the calibration inputs, the more the more correlated they are.

For the experts of a compressed model (`ExpertInputMoments`, `gptq_projection`): H is accumulated
over the calibration tokens routed to each merged expert, streaming (nothing grows with the tokens),
layer by layer in order, each layer's inputs coming from the model whose earlier layers are already
quantized (GPTQ's sequential order). Gate/up (wi) see the block's hidden states, down (wo) the
expert's own hidden activations, computed with the layer's gate/up before they are quantized. A low-rank projection W = L R (+ sparse rows) quantizes R [r, in]
with H of its input x, then L [out, r] with R̂ H R̂^T, the second moment of its actual input R̂ x
(R̂ the quantized R); sparse rows stay float and are not part of the fit. A group that saw fewer
than MIN_GROUP_TOKENS tokens is rounded to nearest (an identity H), too few inputs to fit to.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import compressed_layers
from ..grouped_experts import GroupedLowRankExperts, GroupedProjection
from ..models import FamilyAdapter
from ..models.base import dispatch_to_index
from ..quantization import QuantizedWeight, QuantSpec, block_grid, round_to_grid
from .activation_aware import MIN_GROUP_TOKENS
from .stats import forward_inputs

# H is damped by this share of its mean diagonal (GPTQ's percdamp): it keeps H invertible where
# inputs are few or collinear, and pulls the fit towards round to nearest
DAMP = 0.01


def _inverse_cholesky(hessians: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factors U [G, n, n] of (H + damp mean(diag H) I)^-1, float64, for H [G, n, n].

    An all-zero H (no inputs) becomes the identity: round to nearest. Where the damped H is still
    not positive definite (rounding on near-collinear inputs) the damping grows tenfold until it is.
    """
    hessians = hessians.double()
    eye = torch.eye(hessians.shape[-1], dtype=torch.float64, device=hessians.device)
    mean_diag = hessians.diagonal(dim1=-2, dim2=-1).mean(dim=-1)
    empty = mean_diag <= 0
    hessians = torch.where(empty[:, None, None], eye, hessians)
    mean_diag = torch.where(empty, torch.ones_like(mean_diag), mean_diag)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(hessians + (damp * mean_diag)[:, None, None] * eye)
        if not info.any():
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        damp *= 10
    raise ValueError("the input second moment is not positive definite even damped by 1e4 x its mean diagonal")


def gptq_quantize_batch(
    weights: torch.Tensor, hessians: torch.Tensor, spec: QuantSpec, damp: float = DAMP
) -> list[QuantizedWeight]:
    """GPTQ of G weights [G, out, in] with their input second moments H [G, in, in] (see the module
    docstring), one QuantizedWeight per weight, scales in the weights' dtype."""
    spec.check_shape(tuple(weights.shape[1:]))
    num, out, inp = weights.shape
    if hessians.shape != (num, inp, inp):
        raise ValueError(f"hessians of shape {list(hessians.shape)} for weights {list(weights.shape)}")
    upper = _inverse_cholesky(hessians.to(weights.device), damp)
    work = weights.detach().double().clone()  # the columns not yet quantized absorb the errors
    codes = torch.empty(num, out, inp, dtype=torch.uint8, device=weights.device)
    scales, zeros = [], []
    for start in range(0, inp, spec.block):
        end = start + spec.block
        block = work[:, :, start:end]  # a view: the feedback inside the block updates `work`
        scale, zero = block_grid(block.float(), spec, weights.dtype)  # [G, out]
        zero_value = float(spec.symmetric_zero_point) if zero is None else zero.float()
        errors = torch.empty(num, out, spec.block, dtype=torch.float64, device=weights.device)
        for i in range(spec.block):
            column = start + i
            code = round_to_grid(block[:, :, i : i + 1], scale, zero, spec)  # [G, out, 1]
            restored = (code[..., 0].float() - zero_value) * scale.float()  # dequantize's arithmetic
            error = (block[:, :, i] - restored.double()) / upper[:, column, column, None]
            block[:, :, i + 1 :] -= error[:, :, None] * upper[:, None, column, column + 1 : end]
            errors[:, :, i] = error
            codes[:, :, column] = code[..., 0]
        work[:, :, end:] -= errors @ upper[:, start:end, end:]
        scales.append(scale)
        zeros.append(zero)
    scales = torch.stack(scales, dim=-1)
    zeros = None if spec.symmetric else torch.stack(zeros, dim=-1)
    return [QuantizedWeight(spec, codes[g], scales[g], None if zeros is None else zeros[g]) for g in range(num)]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = DAMP) -> QuantizedWeight:
    """GPTQ of one weight [out, in] given H [in, in], the second moment (or any positive multiple of
    X^T X) of the inputs x [in] it multiplies: codes, scales and zero points in quantization.py's
    format, chosen to keep X W^T rather than W. damp: share of H's mean diagonal added to it."""
    return gptq_quantize_batch(weight[None], hessian[None], spec, damp)[0]


def _stacked_dequantized(quantized: list[QuantizedWeight]) -> torch.Tensor:
    return torch.stack([q.dequantize(torch.float64) for q in quantized])


def gptq_projection(
    projection: GroupedProjection, quant: QuantSpec, hessians: torch.Tensor, damp: float = DAMP
) -> GroupedProjection:
    """A quantized copy of `projection` [G groups] by GPTQ, given its input second moments [G, in, in]:
    the dense weight, or R with H and then L with R̂ H R̂^T (see the module docstring)."""
    spec = projection.spec
    for factor in spec.factors:
        quant.check_shape(spec.factor_shape(factor), f"{factor} factor")
    if spec.dense:
        weight = gptq_quantize_batch(projection.weight.detach(), hessians, quant, damp)
        return projection.quantized(quant, factors={"weight": weight})
    right = gptq_quantize_batch(projection.right.detach(), hessians, quant, damp)
    restored = _stacked_dequantized(right).to(hessians.device)
    left_hessians = restored @ hessians.double() @ restored.transpose(1, 2)
    left = gptq_quantize_batch(projection.left.detach(), left_hessians, quant, damp)
    return projection.quantized(quant, factors={"left": left, "right": right})


class _Enough(Exception):
    """Raised by the hook once a layer's inputs are counted: the rest of the forward is not needed."""


class ExpertInputMoments:
    """The input second moments of every compressed layer's projections, on calibration blocks.

    Called with a layer's index (in `compressed_layers` order) and its experts module, it runs the
    model on the first `max_tokens` tokens (whole blocks; None: all) of `blocks` [N, S] up to that
    layer and returns {projection: [G, in, in] float64}, sums of x x^T over the tokens routed to each
    group (gate and up share one tensor). Run it on layer i after layers < i are quantized, as
    `quantize_experts` does, so each layer is fitted to the inputs the quantized model gives it.
    Memory: one layer's moments at a time.

    routing_weighted: weight each token's x x^T by the square of its routing weight in the group
    (the group's output enters the block's output scaled by it). Not the default: on the embedded
    LM it was within noise of unweighted (int4 G=8: 19.10 vs 19.21, G=4: 20.96 vs 20.93).
    """

    def __init__(
        self, model: nn.Module, adapter: FamilyAdapter, blocks: torch.Tensor, batch_size: int = 8,
        progress: bool = True, min_tokens: int = MIN_GROUP_TOKENS, max_tokens: int | None = None,
        routing_weighted: bool = False,
    ):
        self.model = model
        self.adapter = adapter
        self.blocks = blocks if max_tokens is None else blocks[: max(1, -(-max_tokens // blocks.shape[1]))]
        self.batch_size = batch_size
        self.progress = progress
        self.min_tokens = min_tokens
        self.routing_weighted = routing_weighted

    @torch.no_grad()
    def __call__(self, index: int, experts: GroupedLowRankExperts) -> dict[str, torch.Tensor]:
        layout = experts.layout
        device = experts.expert_to_group.device
        sizes = {name: experts.projections[name].spec.in_features for name in layout.projections}
        kinds = (layout.input_projections[0], layout.output_projections[0])
        sums = {kind: torch.zeros(experts.num_groups, sizes[kind], sizes[kind], dtype=torch.float64, device=device)
                for kind in kinds}
        counts = torch.zeros(experts.num_groups, dtype=torch.long)

        def hook(module: GroupedLowRankExperts, args: tuple, kwargs: dict) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            hidden, picked, picked_weights = args + tuple(kwargs[n] for n in names[len(args):])
            if module.one_hot_dispatch:
                picked, picked_weights = dispatch_to_index(picked), picked_weights.reshape(-1, 1)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            groups = module.expert_to_group[picked.clamp(min=0)]
            groups = torch.where(picked >= 0, groups, -1)
            for group in range(module.num_groups):
                mine = groups == group
                tokens = mine.any(dim=-1)
                x = hidden[tokens]
                if len(x) == 0:
                    continue
                counts[group] += len(x)
                weight = (picked_weights * mine).sum(dim=-1)[tokens, None].float() if self.routing_weighted else 1.0
                for kind, inputs in zip(kinds, (x, module.hidden_activations(x, group))):
                    inputs = inputs.float() * weight
                    sums[kind][group] += (inputs.T @ inputs).double()
            raise _Enough

        handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
        model_device = next(self.model.parameters()).device
        try:
            self.model.eval()
            starts = range(0, len(self.blocks), self.batch_size)
            for start in tqdm(starts, desc=f"GPTQ inputs, layer {index}", unit="batch", disable=not self.progress):
                batch = self.blocks[start : start + self.batch_size].to(model_device)
                try:
                    self.model(**forward_inputs(self.model, self.adapter, batch))
                except _Enough:
                    pass
        finally:
            handle.remove()
        few = counts < self.min_tokens  # too few inputs to fit to: the identity, i.e. round to nearest
        for moments in sums.values():
            moments[few.to(device)] = torch.eye(moments.shape[-1], dtype=torch.float64, device=device)
        return {name: sums[kinds[0] if name in layout.input_projections else kinds[1]] for name in layout.projections}


__all__ = [
    "DAMP",
    "ExpertInputMoments",
    "gptq_projection",
    "gptq_quantize",
    "gptq_quantize_batch",
]
