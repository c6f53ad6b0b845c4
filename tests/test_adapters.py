"""Adapters read every family's experts and write them back without changing the model, and answer
the family facts (routing, shared expert, exportability, what a token reads) the way the model behaves."""

import re

import pytest
import torch

from conftest import EXPERTS, FAMILIES, HIDDEN, INTERMEDIATE, LAYERS, TOP_K, model_inputs, tiny_model
from mcsmoe_deploy import GroupedLowRankExperts, ProjectionSpec, UserError, adapter_for_config
from mcsmoe_deploy.compress import build_grouped_experts
from mcsmoe_deploy.exporters.torch_export import check_exportable
from mcsmoe_deploy.grouped_experts import route_top_k
from mcsmoe_deploy.models import ADAPTERS


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


@pytest.mark.parametrize("family", FAMILIES)
def test_block_output_is_routed_experts_plus_shared_expert(family):
    """With routed experts that output zero, a block's output is exactly the adapter's shared expert output
    (Qwen2-MoE: the sigmoid-gated dense expert, kept unchanged; other families: none, so zero)."""
    model = tiny_model(family)
    adapter = adapter_for_config(model.config)
    block = adapter.moe_layers(model)[0].block
    hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    flat = hidden.reshape(-1, HIDDEN)
    with torch.no_grad():
        before = block(hidden).reshape(-1, HIDDEN)
        shared = adapter.shared_expert_output(block, flat)
        layout = adapter.expert_layout(model.config)
        specs = {name: ProjectionSpec(*layout.projection_shape(name), rank=4) for name in layout.projections}
        zero_experts = GroupedLowRankExperts(layout, list(range(EXPERTS)), specs, adapter.one_hot_dispatch)
        adapter.install_experts(block, zero_experts)  # parameters start at zero: the routed part is zero
        after = block(hidden).reshape(-1, HIDDEN)
    assert before.abs().max() > 0.1 and not torch.allclose(after, before, atol=1e-3)  # the routed part is gone
    if family != "qwen2_moe":
        assert shared is None and torch.equal(after, torch.zeros_like(after))
        return
    assert shared.shape == flat.shape and shared.abs().max() > 0.1
    assert torch.allclose(after, shared, rtol=0, atol=1e-6)
    # and it is the block's own shared expert, gate included
    expected = torch.sigmoid(flat @ block.shared_expert_gate.weight.T) * block.shared_expert(flat)
    assert torch.allclose(shared, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_routing_matches_the_family_router(family, norm_topk_prob):
    """The op's routing with the adapter's top-k and renormalisation picks what the family's router picks."""
    model = tiny_model(family)
    adapter = adapter_for_config(model.config)
    block = adapter.moe_layers(model)[0].block
    router = adapter.router(block)
    # Qwen2-MoE, Qwen3-MoE, OLMoE follow the config switch; Mixtral and Switch ignore it
    model.config.norm_topk_prob = norm_topk_prob
    if hasattr(router, "norm_topk_prob"):
        router.norm_topk_prob = norm_topk_prob
    routing = adapter.routing(model.config)
    hidden = torch.randn(1, 9, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if adapter.one_hot_dispatch:  # Switch: (dispatch [B, S, E], top-1 probability [B, S, 1], logits)
            dispatch, weights, logits = router(hidden)
            index = dispatch.reshape(-1, EXPERTS).argmax(-1, keepdim=True)
        else:
            logits, weights, index = router(hidden.reshape(-1, HIDDEN))
    got_index, got_weights = route_top_k(logits.reshape(-1, EXPERTS), routing.top_k, routing.renormalize)
    assert routing.top_k == (1 if family == "switch_transformers" else TOP_K)
    assert routing.name == ("softmax_topk_norm" if routing.renormalize else "softmax_topk")
    assert torch.equal(got_index, index.reshape(got_index.shape))
    assert torch.allclose(got_weights, weights.reshape(got_weights.shape), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_read_share_counts_exactly_the_routed_experts(family):
    """Checkpoint tensors the adapter calls expert tensors are the experts modules' parameters; a token
    reads k of E of them, every other tensor in full (an untied input embedding: one row)."""
    model = tiny_model(family)
    adapter = adapter_for_config(model.config)
    experts_prefixes = tuple(f"{layer.name}.experts." for layer in adapter.moe_layers(model))
    k = adapter.routing(model.config).top_k
    for name, tensor in model.state_dict().items():
        share = adapter.token_read_share(name, list(tensor.shape), model.config)
        if name.startswith(experts_prefixes):
            assert share == k / EXPERTS, name
        elif "embed_tokens" in name and not model.config.tie_word_embeddings:
            assert share == 1 / tensor.shape[0], name
        else:
            assert share == 1.0, name
    # a compressed layer's tensors are stacked over its G groups
    compressed_name = "model.layers.0.mlp.experts.projections.down.left"
    assert adapter.token_read_share(compressed_name, [3, HIDDEN, 4], model.config) == min(k, 3) / 3


def test_exportable_families_and_the_reason_for_the_rest():
    for adapter in ADAPTERS:
        if adapter.exportable:
            check_exportable(adapter, 18)
            assert not adapter.encoder_decoder
            continue
        assert adapter.not_exportable_because
        with pytest.raises(NotImplementedError, match=re.escape(adapter.not_exportable_because)):
            check_exportable(adapter, 18)
    assert {a.family for a in ADAPTERS if not a.exportable} == {"switch_transformers"}


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


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_forward_with_cache_takes_the_keyword_this_transformers_has(family):
    """forward_with_cache passes the KV cache under the name this transformers version takes (no deprecation
    warning) and returns the grown cache: a prefill then a step equal one forward over the whole sequence."""
    import warnings

    from mcsmoe_deploy.models.kv_cache import cache_keyword, forward_with_cache

    model = tiny_model(family).eval()
    ids = model_inputs(family, batch=1, seq=6)["input_ids"]
    assert cache_keyword(model) in ("cache", "past_key_values")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, cache = forward_with_cache(model, None, input_ids=ids[:, :5])
        step, cache = forward_with_cache(model, cache, input_ids=ids[:, 5:])
        whole = model(input_ids=ids, use_cache=False)
    assert cache.get_seq_length() == 6
    torch.testing.assert_close(step.logits[:, -1], whole.logits[:, -1], rtol=1e-5, atol=1e-5)
