"""A compressed model as a standard checkpoint of its own family: G plain experts and a G-row router.

Pruned layers (experts removed, router rows with them) are the same function in both formats.
Merged layers are not: our format keeps the E-row router and sends a token routed to any member to
the group's merged expert (picks in one group add), while a standard router scores G experts with
the dominant experts' rows alone, so a token's softmax and top-k run over G logits. Router
calibration (`calibrate_routers`) can then fit those G rows to the dense model.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import UserError
from ..models import FamilyAdapter
from .plan import AppliedPlan


def check_standard(adapter: FamilyAdapter, applied: AppliedPlan) -> int:
    """The one G of every layer; UserError (one line) if a standard checkpoint cannot hold `applied`."""
    if adapter.num_experts_key is None or adapter.encoder_decoder:
        raise UserError(f"--format standard is not available for the {adapter.family} family; use our format")
    counts = sorted({layer.grouping.num_groups for layer in applied.layers})
    if len(counts) != 1:
        raise UserError(f"layer-adaptive G ({counts[0]} to {counts[-1]} experts per layer) cannot be expressed in "
                        "a standard config, which has one expert count; use our format or drop --adaptive")
    if any(not spec.dense or spec.quant is not None for layer in applied.layers for spec in layer.projections.values()):
        raise UserError("a standard checkpoint holds plain experts; low-rank or quantized experts need our format")
    return counts[0]


def to_standard_model(model: nn.Module, adapter: FamilyAdapter, applied: AppliedPlan) -> nn.Module:
    """A plain transformers model of `model`'s family with G experts per layer, from `model` with
    compressed experts installed (merge-only, unquantized). Group g becomes expert g; its router row is
    the row of the group's dominant expert. `model` is left as it was; non-expert tensors are shared."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    num_experts = check_standard(adapter, applied)
    config = copy.deepcopy(model.config)
    setattr(config, adapter.num_experts_key, num_experts)
    config.mcsmoe_standard = {  # where the experts came from (transformers keeps unknown config keys)
        "family": applied.family,
        "layers": {layer.name: {"dominant_experts": layer.grouping.dominant_experts,
                                "expert_to_group": layer.grouping.expert_to_group} for layer in applied.layers},
    }
    with init_empty_weights(include_buffers=False):
        standard = AutoModelForCausalLM.from_config(config, dtype=adapter.router_weight(
            adapter.moe_layers(model)[0].block).dtype)
    source_layers = adapter.moe_layers(model)
    module_names = {id(module): name for name, module in model.named_modules()}
    replaced = tuple(f"{module_names[id(adapter.router(layer.block))]}." for layer in source_layers)
    replaced += tuple(f"{layer.name}.experts." for layer in source_layers)
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(replaced)}
    standard.load_state_dict(state, strict=False, assign=True)
    layout = adapter.expert_layout(model.config)
    for source, target, layer in zip(source_layers, adapter.moe_layers(standard), applied.layers):
        weights = {name: source.block.experts.projections[name].dense_weight() for name in layout.projections}
        experts = [{name: weights[name][g] for name in layout.projections} for g in range(num_experts)]
        router = adapter.router_weight(source.block).detach()
        rows = [e if layer.router_rows is None else layer.router_rows.index(e) for e in layer.grouping.dominant_experts]
        adapter.write_standard_experts(target.block, experts, router[rows])
    standard.tie_weights()
    missing = [name for name, p in standard.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the standard model lacks {len(missing)} tensors, e.g. {missing[0]}")
    return standard.eval()
