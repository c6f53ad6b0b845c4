"""Adapters read every family's experts and write them back without changing the model."""

import pytest
import torch

from conftest import EXPERTS, FAMILIES, HIDDEN, INTERMEDIATE, LAYERS, model_inputs, tiny_model
from mcsmoe_deploy import GroupedLowRankExperts, ProjectionSpec, UserError, adapter_for_config
from mcsmoe_deploy.compress import build_grouped_experts


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_one_expert_per_group_reproduces_logits(family):
    model = tiny_model(family)
    adapter = adapter_for_config(model.config)
    inputs = model_inputs(family)
    with torch.no_grad():
        reference = model(**inputs).logits
    layout = adapter.expert_layout(model.config)
    layers = adapter.moe_layers(model)
    expected_layers = 2 * LAYERS if family == "switch_transformers" else LAYERS
    assert len(layers) == expected_layers
    for layer in layers:
        experts = adapter.read_experts(layer.block)
        assert len(experts) == EXPERTS
        assert {name: tuple(w.shape) for name, w in experts[0].items()} == {
            name: layout.projection_shape(name) for name in layout.projections
        }
        specs = {name: ProjectionSpec(*layout.projection_shape(name)) for name in layout.projections}
        module = build_grouped_experts(experts, list(range(EXPERTS)), specs, layout, adapter.one_hot_dispatch)
        adapter.install_experts(layer.block, module)
    assert all(isinstance(layer.block.experts, GroupedLowRankExperts) for layer in adapter.moe_layers(model))
    with torch.no_grad():
        rewritten = model(**inputs).logits
    # same arithmetic up to float rounding: gate and up are separate matmuls here, one fused matmul there
    assert relative_error(rewritten, reference) < 1e-5


def test_qwen2_shared_expert_is_kept_dense():
    model = tiny_model("qwen2_moe")
    adapter = adapter_for_config(model.config)
    block = adapter.moe_layers(model)[0].block
    shared_before = block.shared_expert.gate_proj.weight.clone()
    layout = adapter.expert_layout(model.config)
    specs = {name: ProjectionSpec(*layout.projection_shape(name), rank=4) for name in layout.projections}
    adapter.install_experts(block, build_grouped_experts(adapter.read_experts(block)[:1], [0] * EXPERTS, specs, layout))
    assert torch.equal(block.shared_expert.gate_proj.weight, shared_before)


def test_layout_of_gated_and_plain_families():
    mixtral = adapter_for_config(tiny_model("mixtral").config).expert_layout(tiny_model("mixtral").config)
    assert mixtral.gated and mixtral.projections == ("gate", "up", "down")
    assert mixtral.projection_shape("down") == (HIDDEN, INTERMEDIATE)
    switch = tiny_model("switch_transformers")
    layout = adapter_for_config(switch.config).expert_layout(switch.config)
    assert not layout.gated and layout.projections == ("wi", "wo") and layout.activation == "relu"


def test_unsupported_and_non_moe_configs_name_the_supported_families():
    with pytest.raises(UserError, match="not a mixture-of-experts model.*supported families: mixtral"):
        adapter_for_config({"model_type": "llama"})
    with pytest.raises(UserError, match="unsupported mixture-of-experts model type 'deepseek_v3'"):
        adapter_for_config({"model_type": "deepseek_v3", "n_routed_experts": 64})
