"""The quantization stage: weights to blockwise int4 / int8 codes (round to nearest), experts and beyond.

It runs last, after merging, low rank and distillation. Scope "experts" quantizes every
projection factor of the compressed experts (GroupedLowRankExperts); scope "all" also replaces
every other linear layer of a decoder-only model (attention q/k/v/o, a shared expert and its
gate, the LM head; routers and embeddings stay float) by a QuantizedLinear; scope "all+embeddings"
also the input embedding table by a QuantizedEmbedding (round to nearest; when it was tied to the
LM head, the table is the head's quantized weight, whatever method chose its codes). The arithmetic is
quantization.py's, and the result is what `load_compressed` of the saved checkpoint computes.
`mcsmoe-export --quantize` runs the same `quantize_model` on a model in memory.

Two methods, one stored format: "rtn" rounds each weight to nearest; "gptq" (gptq.py) fits the
codes to the calibration inputs each expert sees, given a provider of input second moments called
layer by layer, and (gptq_linears.py) those of every other linear layer, given a provider of
their input second moments called once, before anything is quantized.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..checkpoint import compressed_layers
from ..errors import ParameterError
from ..grouped_experts import GroupedLowRankExperts
from ..models import FamilyAdapter
from ..quantization import QuantSpec, quantize
from ..quantized_embedding import check_quantizable_embeddings, quantize_input_embeddings
from ..quantized_linear import QuantizeWeight, quantize_linears
from .gptq import gptq_projection
from .gptq_linears import gptq_weight_for
from .plan import AppliedPlan
from .recipe import EMBEDDINGS_SCOPE, QUANT_SCOPES

# (layer index, its experts) -> {projection name: second moment of its inputs per group [G, in, in]};
# called for layer i after layers < i are quantized (gptq.ExpertInputMoments runs the model for it)
InputMoments = Callable[[int, GroupedLowRankExperts], Mapping[str, torch.Tensor]]
# (names of linear layers) -> {name: second moment of its inputs [in, in]} (gptq_linears.LinearInputMoments)
LinearMoments = Callable[[list[str]], Mapping[str, torch.Tensor]]


def linears_to_quantize(model: nn.Module, adapter: FamilyAdapter) -> list[str]:
    """Names of the nn.Linear layers scope "all" quantizes besides the experts, in module order.

    Every linear layer of a decoder-only model except the MoE routers (whose logits pick the
    experts; tiny, and read as float by the exported graph). Encoder-decoder families (Switch
    Transformers) give none: their dense layers read their weight's dtype, so they keep float layers.
    """
    if adapter.encoder_decoder:
        return []
    routers = {id(adapter.router(layer.block)) for layer in adapter.moe_layers(model)}
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module) not in routers]


def check_quantizable(model: nn.Module, adapter: FamilyAdapter, quant: QuantSpec, scope: str) -> None:
    """ParameterError (one line, naming the weight) unless `quant` can quantize what `scope` covers of
    `model`: `quant.block` must divide the input size of every expert factor and (scope "all") linear layer."""
    if scope not in QUANT_SCOPES:
        raise ParameterError("quant_scope", f"must be one of {', '.join(QUANT_SCOPES)}, not {scope!r}")
    if scope == EMBEDDINGS_SCOPE and adapter.encoder_decoder:
        raise ParameterError("quant_scope", f"{scope} is for decoder-only families: {adapter.family} keeps float "
                                            "embeddings and dense layers (use all or experts)")
    inputs = [(f"{layer_name}.projections.{name}.{factor}", projection.spec.factor_shape(factor)[1])
              for layer_name, layer in model.named_modules() if isinstance(layer, GroupedLowRankExperts)
              for name, projection in layer.projections.items() for factor in projection.spec.factors]
    if scope != "experts":
        inputs += [(name, model.get_submodule(name).in_features) for name in linears_to_quantize(model, adapter)]
    if scope == EMBEDDINGS_SCOPE:
        inputs += [("the input embeddings", model.get_input_embeddings().embedding_dim)]
    for where, size in inputs:
        if size % quant.block:
            sizes = {size for _, size in inputs}
            fits = [b for b in (256, 128, 64, 32, 16) if all(s % b == 0 for s in sizes)]
            hint = f"; {fits[0]} divides every one" if fits else ""
            raise ParameterError("quant_block", f"{quant.block} does not divide the input size {size} of {where}{hint}")


def _quantize_expert_layers(model: nn.Module, quant: QuantSpec, quantize_weight: QuantizeWeight,
                            input_moments: InputMoments | None) -> None:
    for index, experts in enumerate(compressed_layers(model)):
        moments = None if input_moments is None else input_moments(index, experts)
        for name, projection in list(experts.projections.items()):
            experts.projections[name] = (projection.quantized(quant, quantize_weight) if moments is None
                                         else gptq_projection(projection, quant, moments[name]))


def quantize_model(
    model: nn.Module, adapter: FamilyAdapter, quant: QuantSpec, scope: str = "all",
    quantize_weight: QuantizeWeight = quantize, input_moments: InputMoments | None = None,
    linear_moments: LinearMoments | None = None,
) -> list[str]:
    """Quantize `model` in place: every compressed experts' projection factor and, with scope "all"
    or "all+embeddings", the layers `linears_to_quantize` names (and with the latter the input
    embeddings, round to nearest or, tied, as the LM head). Returns those layers' names (empty for
    "experts").

    Everything is checked (`check_quantizable`) before anything changes. `quantize_weight` is the
    one function turning a weight [out, in] into codes (default: round to nearest). input_moments:
    None quantizes the experts by `quantize_weight`; given, each layer's expert projections are
    quantized by GPTQ with the moments it returns for that layer (see gptq.py). linear_moments: None
    quantizes the other linear layers by `quantize_weight`; given, it is called once with their names
    on the model before anything is quantized, and each is quantized by GPTQ fitted to its moments.
    """
    check_quantizable(model, adapter, quant, scope)
    names = linears_to_quantize(model, adapter) if scope != "experts" else []
    tied_head = tied_output_embeddings(model) if scope == EMBEDDINGS_SCOPE else None
    if scope == EMBEDDINGS_SCOPE:
        check_quantizable_embeddings(model, quant)
    moments = linear_moments(names) if linear_moments is not None and names else {}
    _quantize_expert_layers(model, quant, quantize_weight, input_moments)
    for name in names:
        weight_fn = gptq_weight_for(moments[name]) if name in moments else quantize_weight
        quantize_linears(model, [name], quant, weight_fn)
    if scope == EMBEDDINGS_SCOPE:
        quantize_input_embeddings(model, quant, tied_head if tied_head in names else None, quantize_weight)
    return names


def tied_output_embeddings(model: nn.Module) -> str | None:
    """The module name of `model`'s LM head when it holds the input embeddings' table itself (tied), else None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embedding is None or getattr(head, "weight", None) is not getattr(embedding, "weight", 0):
        return None
    return next(name for name, module in model.named_modules() if module is head)


def quantize_experts(model: nn.Module, applied: AppliedPlan, quant: QuantSpec,
                     input_moments: InputMoments | None = None,
                     quantize_weight: QuantizeWeight = quantize) -> AppliedPlan:
    """Replace every projection of `model`'s compressed experts by its quantized copy, in place
    (input_moments and quantize_weight as in `quantize_model`).

    Returns `applied` with each projection's spec carrying `quant` (what the checkpoint records).
    """
    if len(compressed_layers(model)) != len(applied.layers):
        raise ValueError(f"the model has {len(compressed_layers(model))} compressed layers, the plan "
                         f"{len(applied.layers)}")
    _quantize_expert_layers(model, quant, quantize_weight, input_moments)
    return applied_with_quantized_experts(model, applied)


def applied_with_quantized_experts(model: nn.Module, applied: AppliedPlan) -> AppliedPlan:
    """`applied` with each layer's projection specs read from `model`'s (quantized) experts."""
    modules = compressed_layers(model)
    if len(modules) != len(applied.layers):
        raise ValueError(f"the model has {len(modules)} compressed layers, the plan {len(applied.layers)}")
    layers = [dataclasses.replace(layer, projections={name: experts.projections[name].spec for name in layer.projections})
              for experts, layer in zip(modules, applied.layers)]
    return dataclasses.replace(applied, layers=layers)


__all__ = [
    "InputMoments",
    "LinearMoments",
    "QUANT_SCOPES",
    "applied_with_quantized_experts",
    "check_quantizable",
    "linears_to_quantize",
    "quantize_experts",
    "quantize_model",
    "tied_output_embeddings",
]
