"""Routing statistics, grouping, the whole compression pipeline and the compressed checkpoint."""

import copy
import json

import pytest
import torch

from conftest import EXPERTS, FAMILIES, byte_tokenizer, model_inputs, tiny_model
from mcsmoe_deploy import (
    CompressionRecipe,
    ProjectionSpec,
    adapter_for_config,
    apply_plan,
    build_grouped_experts,
    builtin_corpus,
    calibration_blocks,
    compress_loaded,
    collect_routing_stats,
    compress_model,
    distill,
    distillation_loss,
    load_compressed,
    load_tokenizer,
    plan_compression,
    token_blocks,
    train_compressed_experts,
)
from mcsmoe_deploy.compress.grouping import group_by_similarity, groups_per_layer


def calibration(seq_len: int = 32, tokens: int = 1024) -> torch.Tensor:
    return token_blocks(byte_tokenizer(), builtin_corpus("train"), seq_len, tokens)


def test_routing_statistics_match_a_direct_computation():
    model = tiny_model("mixtral")
    adapter = adapter_for_config(model.config)
    blocks = calibration()
    stats = collect_routing_stats(model, adapter, blocks, batch_size=5, progress=False)
    captured = []
    block = adapter.moe_layers(model)[1].block
    handle = block.gate.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model(input_ids=blocks)
    handle.remove()
    logits, _, indices = captured[0]
    layer = stats.layers[1]
    counts = torch.bincount(indices.reshape(-1), minlength=EXPERTS).double()
    assert torch.equal(layer.assignment_counts, counts)
    assert torch.allclose(layer.frequency, counts / counts.sum())
    gram = logits.double().T @ logits.double()
    assert torch.allclose(layer.logit_gram, gram, rtol=1e-6)
    norms = gram.diagonal().sqrt()
    assert torch.allclose(layer.similarity("router-logits"), gram / norms[:, None] / norms[None, :], rtol=1e-6)
    assert stats.tokens == blocks.numel() and layer.tokens == blocks.numel()


def test_grouping_dominant_and_most_similar():
    frequency = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.05, 0.15, 0.05, 0.05])
    similarity = torch.eye(8)
    similarity[0, 3] = similarity[2, 5] = similarity[4, 1] = similarity[6, 3] = similarity[7, 5] = 0.9
    grouping = group_by_similarity(frequency, similarity, 3)
    assert grouping.dominant_experts == [1, 3, 5]
    assert grouping.expert_to_group == [1, 0, 2, 1, 0, 2, 1, 2]
    assert grouping.members(1) == [3, 0, 6]


def test_adaptive_budget_keeps_total_and_one_per_layer():
    busy = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0])
    skewed = torch.tensor([0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    counts = groups_per_layer([busy, skewed, busy], 3, adaptive=True)
    assert sum(counts) == 9 and min(counts) >= 1
    assert counts[1] < counts[0]
    assert groups_per_layer([busy, skewed], 3, adaptive=False) == [3, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_compression_reproduces_merged_model(family):
    model = tiny_model(family)
    adapter = adapter_for_config(model.config)
    stats = collect_routing_stats(model, adapter, calibration(), progress=False)
    recipe = CompressionRecipe(experts=4)  # merge only
    apply_plan(model, adapter, plan_compression(stats, EXPERTS, recipe, adapter.family), recipe, progress=False)
    full_rank = copy.deepcopy(model)
    layout = adapter.expert_layout(model.config)
    for layer in adapter.moe_layers(full_rank):
        merged = layer.block.experts
        experts = [{n: merged.projections[n].weight[g] for n in layout.projections} for g in range(merged.num_groups)]
        # rank min(out, in) with no sparse rows: the factors hold the whole weight
        specs = {n: ProjectionSpec(*layout.projection_shape(n), rank=min(layout.projection_shape(n)))
                 for n in layout.projections}
        module = build_grouped_experts(experts, merged.expert_to_group.tolist(), specs, layout, adapter.one_hot_dispatch)
        adapter.install_experts(layer.block, module)
    inputs = model_inputs(family)
    with torch.no_grad():
        reference, compressed = model(**inputs).logits, full_rank(**inputs).logits
    assert float((compressed - reference).abs().max() / reference.abs().max()) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_reloads_to_same_logits(family, tiny_dirs, tmp_path):
    recipe = CompressionRecipe(experts=3, rank_ratio=0.5, sparse_keep=0.1, max_calib_tokens=1024, calib_seq_len=32)
    out = tmp_path / "compressed"
    result = compress_model(tiny_dirs[family], out, recipe, progress=False)
    assert result.after.expert_parameters < 0.5 * result.before.expert_parameters
    config = json.loads((out / "config.json").read_text())
    section = config["mcsmoe"]
    assert section["family"] == family and section["recipe"]["rank_ratio"] == 0.5
    layer = next(iter(section["layers"].values()))
    assert layer["num_groups"] == 3 and len(layer["expert_to_group"]) == EXPERTS
    assert layer["projections"][("gate" if family != "switch_transformers" else "wi")]["sparse_rows"] > 0
    assert (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".compressed.*")), "staging folder left behind"
    reloaded = load_compressed(out)
    adapter = adapter_for_config(reloaded.config)
    for layer in adapter.moe_layers(reloaded):
        assert layer.block.experts.num_groups == 3
        assert layer.block.experts.projections[adapter.expert_layout(reloaded.config).projections[0]].left.shape[0] == 3
    # the same recipe applied in memory to the same weights gives the same logits
    model = tiny_model(family)
    compress_loaded(model, adapter, calibration_blocks(load_tokenizer(tiny_dirs[family]), recipe), recipe, progress=False)
    inputs = model_inputs(family)
    with torch.no_grad():
        expected = model(**inputs).logits
        # equal weights; transformers may pick another attention kernel for a model built from a config
        assert float((reloaded(**inputs).logits - expected).abs().max() / expected.abs().max()) < 1e-5


def test_distillation_lowers_the_loss():
    teacher = tiny_model("mixtral")
    adapter = adapter_for_config(teacher.config)
    student = copy.deepcopy(teacher)
    blocks = calibration()
    stats = collect_routing_stats(student, adapter, blocks, progress=False)
    recipe = CompressionRecipe(experts=2, rank_ratio=0.3)
    apply_plan(student, adapter, plan_compression(stats, EXPERTS, recipe, adapter.family), recipe, progress=False)
    router_before = adapter.moe_layers(student)[0].block.gate.weight.clone()
    embedding_before = student.get_input_embeddings().weight.clone()

    @torch.no_grad()
    def loss_on_all_blocks() -> float:  # a fixed set, unlike the random batches the report's losses come from
        return distillation_loss(student(input_ids=blocks).logits, teacher(input_ids=blocks).logits, blocks).item()

    before = loss_on_all_blocks()
    report = distill(student, teacher, adapter, blocks, steps=30, lr=3e-3, batch_size=4, progress=False)
    assert report.steps == 30
    assert loss_on_all_blocks() < 0.99 * before  # measured 0.971
    assert torch.equal(adapter.moe_layers(student)[0].block.gate.weight, router_before)
    assert torch.equal(student.get_input_embeddings().weight, embedding_before)
    assert not any(p.requires_grad for p in student.parameters())


def test_train_compressed_experts_takes_any_loss_and_decays_the_rate_to_zero():
    model = tiny_model("mixtral")
    adapter = adapter_for_config(model.config)
    stats = collect_routing_stats(model, adapter, calibration(), progress=False)
    recipe = CompressionRecipe(experts=2)
    apply_plan(model, adapter, plan_compression(stats, EXPERTS, recipe, adapter.family), recipe, progress=False)
    ids = calibration()[:2]
    target = torch.zeros(2, model.config.vocab_size)
    snapshots = []

    def batch_loss(step: int) -> torch.Tensor:
        snapshots.append([p.detach().clone() for p in adapter.moe_layers(model)[0].block.experts.parameters()])
        return (model(input_ids=ids).logits[:, -1] - target).pow(2).mean()

    report = train_compressed_experts(model, batch_loss, steps=4, lr=1e-2, progress=False)
    assert report.last_loss < report.first_loss and report.lr == 1e-2
    # AdamW moves each weight by about lr x schedule per step: 1, 0.75, 0.5, 0.25 of 1e-2
    moves = [max((a - b).abs().max().item() for a, b in zip(x, y)) for x, y in zip(snapshots, snapshots[1:])]
    assert moves == pytest.approx([1e-2, 0.75e-2, 0.5e-2], rel=0.05)
    assert train_compressed_experts(model, batch_loss, steps=0, progress=False).steps == 0
    with pytest.raises(ValueError, match="no compressed experts"):
        train_compressed_experts(tiny_model("mixtral"), batch_loss, steps=1)


def test_distillation_rate_defaults_by_the_kind_of_recipe():
    assert CompressionRecipe().distill_learning_rate == 3e-4  # merge only: a higher rate undoes the merge
    assert CompressionRecipe(rank_ratio=0.5).distill_learning_rate == 1e-3
    assert CompressionRecipe(rank_energy=0.9).distill_learning_rate == 1e-3
    assert CompressionRecipe(rank_ratio=0.5, distill_lr=2e-4).distill_learning_rate == 2e-4


def test_activation_aware_compression_is_closer_to_the_merged_model():
    model = tiny_model("mixtral")
    adapter = adapter_for_config(model.config)
    stats = collect_routing_stats(model, adapter, calibration(tokens=2048), progress=False, keep_inputs=2048)
    assert stats.layers[0].samples()[0].shape == (2048, model.config.hidden_size)
    outputs = {}
    for name, recipe in {
        "merged": CompressionRecipe(experts=4),
        "plain": CompressionRecipe(experts=4, rank_ratio=0.4),
        "aware": CompressionRecipe(experts=4, rank_ratio=0.4, low_rank="activation-aware"),
    }.items():
        compressed = copy.deepcopy(model)
        apply_plan(compressed, adapter, plan_compression(stats, EXPERTS, recipe, adapter.family), recipe, progress=False)
        with torch.no_grad():
            outputs[name] = compressed(input_ids=calibration(tokens=256)).logits
    plain_error = (outputs["plain"] - outputs["merged"]).norm()
    aware_error = (outputs["aware"] - outputs["merged"]).norm()
    assert aware_error < 0.8 * plain_error, (float(aware_error), float(plain_error))


def test_a_registered_grouping_is_planned_by_name():
    from mcsmoe_deploy import GROUPINGS, LayerGrouping, register_grouping

    seen = []

    @register_grouping("first-g")
    def first_experts_lead(layer, num_groups, context):  # lead with experts 0..G-1, the rest join the last group
        seen.append((layer.name, num_groups, context.similarity))
        return LayerGrouping([min(e, num_groups - 1) for e in range(len(layer.frequency))], list(range(num_groups)))

    try:
        model = tiny_model("mixtral")
        adapter = adapter_for_config(model.config)
        stats = collect_routing_stats(model, adapter, calibration(), progress=False)
        plan = plan_compression(stats, EXPERTS, CompressionRecipe(experts=3, grouping="first-g"), adapter.family)
    finally:
        del GROUPINGS["first-g"]
    assert seen == [(layer.name, 3, "router-logits") for layer in stats.layers]
    assert all(layer.grouping.expert_to_group == [0, 1, 2, 2, 2, 2, 2, 2] for layer in plan.layers)


def test_a_registered_similarity_is_what_similarity_grouping_uses():
    from mcsmoe_deploy import SIMILARITIES, register_similarity

    @register_similarity("expert-index")  # experts are similar when their indices are close
    def index_gram(layer):
        index = torch.arange(len(layer.frequency), dtype=torch.float64) + 1
        return torch.exp(-(index[:, None] - index[None, :]).abs()) * index[:, None] * index[None, :]

    try:
        layer = collect_routing_stats(tiny_model("mixtral"), adapter_for_config(tiny_model("mixtral").config),
                                      calibration(), progress=False).layers[0]
        similarity = layer.similarity("expert-index")
    finally:
        del SIMILARITIES["expert-index"]
    assert similarity[2, 3] == pytest.approx(float(torch.exp(torch.tensor(-1.0, dtype=torch.float64))))
    assert similarity[0, 7] == pytest.approx(float(torch.exp(torch.tensor(-7.0, dtype=torch.float64))))


def test_apply_plan_returns_what_it_built_and_leaves_the_plan_alone():
    model = tiny_model("mixtral")
    adapter = adapter_for_config(model.config)
    stats = collect_routing_stats(model, adapter, calibration(), progress=False)
    recipe = CompressionRecipe(experts=3, rank_ratio=0.5, sparse_keep=0.1)
    plan = plan_compression(stats, EXPERTS, recipe, adapter.family)
    before = copy.deepcopy([(layer.name, layer.frequency, layer.grouping) for layer in plan.layers])
    applied = apply_plan(model, adapter, plan, recipe, progress=False)
    assert [(layer.name, layer.frequency, layer.grouping) for layer in plan.layers] == before
    layout = adapter.expert_layout(model.config)
    assert [layer.name for layer in applied.layers] == [layer.name for layer in plan.layers]
    assert applied.calibration_tokens == stats.tokens and applied.family == "mixtral"
    for layer, moe in zip(applied.layers, adapter.moe_layers(model)):
        assert layer.grouping.num_groups == 3 == moe.block.experts.num_groups
        for name in layout.projections:
            out_features, in_features = layout.projection_shape(name)
            spec = layer.projections[name]
            assert spec.rank == int(0.5 * out_features * in_features / (out_features + in_features))
            assert spec.sparse_rows == -(-out_features // 10)  # ceil(0.1 x rows)
            assert moe.block.experts.projections[name].left.shape[-1] == spec.rank
        assert layer.to_dict()["projections"]["down"]["rank"] == layer.projections["down"].rank


def test_one_calibrated_model_serves_several_recipes_like_separate_runs(tiny_dirs):
    from mcsmoe_deploy import CalibratedModel

    recipe = CompressionRecipe(experts=3, rank_ratio=0.5, max_calib_tokens=1024, calib_seq_len=32)
    source = CalibratedModel(tiny_dirs["mixtral"], recipe, device="cpu", progress=False)
    dense = copy.deepcopy(source.model.state_dict())
    merged = source.compress(CompressionRecipe(experts=3, max_calib_tokens=1024, calib_seq_len=32))
    stats = source.stats
    compressed = source.compress()
    assert source.stats is stats  # one pass for both recipes
    assert all(torch.equal(dense[k], v) for k, v in source.model.state_dict().items())  # copies were compressed
    assert [lay.grouping for lay in merged.applied.layers] == [lay.grouping for lay in compressed.applied.layers]
    assert all(spec.rank is None for spec in merged.applied.layers[0].projections.values())
    # the same as compressing a fresh model with compress_loaded
    alone = copy.deepcopy(source.model)
    compress_loaded(alone, source.adapter, source.blocks, recipe, progress=False)
    inputs = model_inputs("mixtral")
    with torch.no_grad():
        assert torch.equal(alone(**inputs).logits, compressed.model(**inputs).logits)
    with pytest.raises(ValueError, match="calibrates differently.*max_calib_tokens"):
        source.compress(CompressionRecipe(experts=3, max_calib_tokens=2048, calib_seq_len=32))
    with pytest.raises(ValueError, match="calibrates differently"):  # needs inputs the pass did not keep
        source.compress(CompressionRecipe(experts=3, low_rank="activation-aware", max_calib_tokens=1024,
                                          calib_seq_len=32))
    source.compress(in_place=True)
    with pytest.raises(ValueError, match="compressed in place"):
        source.compress()
