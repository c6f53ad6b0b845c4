"""Output-aware grouping (hc), saliency pruning (reap), router calibration and the standard format."""

import copy
import json

import pytest
import torch

from conftest import EXPERTS, HIDDEN, model_inputs, tiny_model
from mcsmoe_deploy import (
    CompressionRecipe,
    adapter_for_config,
    calibrate_routers,
    cluster_by_outputs,
    collect_routing_stats,
    kl_to_teacher,
    compress_loaded,
    compress_model,
    load_compressed,
    prune_by_saliency,
    routing_weights,
    to_standard_model,
)
from mcsmoe_deploy.errors import ParameterError, UserError
from mcsmoe_deploy.models import Routing
from test_pipeline import calibration


def test_hc_clusters_experts_by_mean_output_and_leads_by_frequency():
    # three directions: experts {0, 3, 5} ~ x, {1, 4} ~ y, {2, 6, 7} ~ z, with small perturbations
    x, y, z = torch.eye(3, dtype=torch.float64)
    outputs = torch.stack([x, y + 0.1 * x, z, 2 * x + 0.1 * z, 3 * y, x + 0.05 * y, z - 0.1 * y, 4 * z])
    frequency = torch.tensor([0.05, 0.10, 0.20, 0.15, 0.05, 0.10, 0.30, 0.05])
    grouping = cluster_by_outputs(outputs, frequency, 3)
    # groups numbered by their dominant expert: the most used member of each cluster
    assert grouping.dominant_experts == [1, 3, 6]
    assert grouping.expert_to_group == [1, 0, 2, 1, 0, 1, 2, 2]
    assert grouping.members(2) == [6, 2, 7]  # the dominant first: the alignment reference
    # G = E: every expert alone; G = 1: one group led by the most used
    assert cluster_by_outputs(outputs, frequency, 8).expert_to_group == list(range(8))
    one = cluster_by_outputs(outputs, frequency, 1)
    assert one.expert_to_group == [0] * 8 and one.dominant_experts == [6]


def test_hc_uses_average_linkage():
    # 1-D points on a line as unit vectors at angles: average and single linkage disagree here
    angles = torch.tensor([0.0, 0.30, 0.62, 0.95, 1.25], dtype=torch.float64)
    outputs = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    frequency = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    expected = fcluster(linkage(pdist(outputs.numpy(), "cosine"), "average"), 2, "maxclust")
    grouping = cluster_by_outputs(outputs, frequency, 2)
    same = [[a == b for b in expected] for a in expected]
    assert [[ga == gb for gb in grouping.expert_to_group] for ga in grouping.expert_to_group] == same


def test_hc_gives_g_groups_when_experts_are_identical():
    # upcycled, untrained experts: every distance ties at 0; still exactly G groups
    outputs = torch.ones(6, 4, dtype=torch.float64)
    grouping = cluster_by_outputs(outputs, torch.tensor([0.1, 0.3, 0.1, 0.2, 0.2, 0.1]), 3)
    assert grouping.num_groups == 3 and sorted(set(grouping.expert_to_group)) == [0, 1, 2]


def test_reap_keeps_the_most_salient_experts():
    saliency = torch.tensor([0.3, 0.9, 0.0, 0.5, 0.9, 0.1, 0.2, 0.4], dtype=torch.float64)
    grouping = prune_by_saliency(saliency, 3)
    assert grouping.dominant_experts == [1, 3, 4]
    assert grouping.expert_to_group == [-1, 0, -1, 1, 2, -1, -1, -1]
    # a tie goes to the lower index
    assert prune_by_saliency(saliency, 1).dominant_experts == [1]


def test_expert_output_statistics_match_a_direct_computation():
    model = tiny_model("mixtral")
    adapter = adapter_for_config(model.config)
    blocks = calibration(tokens=256)
    stats = collect_routing_stats(model, adapter, blocks, batch_size=3, progress=False, expert_outputs=True)
    block = adapter.moe_layers(model)[1].block
    captured = []
    handle = block.gate.register_forward_hook(lambda m, i, o: captured.append((i[0], o)))
    with torch.no_grad():
        model(input_ids=blocks)
    handle.remove()
    hidden, (logits, weights, indices) = captured[0]
    layer = stats.layers[1]
    with torch.no_grad():
        outputs = torch.stack([adapter.expert_output(block, e, hidden).double() for e in range(EXPERTS)])  # [E, T, H]
    assert layer.mean_output.shape == (EXPERTS, HIDDEN)
    assert torch.allclose(layer.mean_output, outputs.mean(dim=1), rtol=1e-5, atol=1e-7)
    # Mixtral's own top-k weights, as the statistics pass recomputes them from the logits
    assert torch.allclose(routing_weights(logits, indices, Routing(2, True)), weights.double(), atol=1e-6)
    norms = outputs.norm(dim=-1)  # [E, T]
    for e in range(EXPERTS):
        token, pick = (indices == e).nonzero(as_tuple=True)
        expected = (weights[token, pick].double() * norms[e, token]).mean()
        assert torch.allclose(layer.saliency[e], expected, rtol=1e-5)
    # without asking, no expert is run
    plain = collect_routing_stats(model, adapter, blocks, progress=False).layers[0]
    with pytest.raises(ValueError, match="expert_outputs=True"):
        plain.saliency


@pytest.fixture(scope="module")
def reap_model():
    model = tiny_model("mixtral")
    adapter = adapter_for_config(model.config)
    recipe = CompressionRecipe(experts=3, grouping="reap", max_calib_tokens=1024, calib_seq_len=32)
    applied = compress_loaded(model, adapter, calibration(), recipe, progress=False)
    return model, adapter, applied


def test_reap_removes_router_rows_and_is_exact_for_kept_experts(reap_model):
    model, adapter, applied = reap_model
    dense = tiny_model("mixtral")
    for layer, dense_layer, built in zip(adapter.moe_layers(model), adapter.moe_layers(dense), applied.layers):
        kept = built.grouping.dominant_experts
        assert built.router_rows == kept and built.expert_to_group == [0, 1, 2]
        assert torch.equal(layer.block.gate.weight, dense_layer.block.gate.weight[kept])
        experts = layer.block.experts.projections
        gate_up = dense_layer.block.experts.gate_up_proj[kept]
        assert torch.equal(experts["gate"].weight, gate_up[:, : gate_up.shape[1] // 2])
    # the reference: the dense model whose routers score the kept experts alone
    for layer, built in zip(adapter.moe_layers(dense), applied.layers):
        adapter.keep_router_rows(layer.block, built.router_rows)
        experts = layer.block.experts
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[built.router_rows])
        experts.down_proj = torch.nn.Parameter(experts.down_proj[built.router_rows])
        experts.num_experts = 3
    inputs = model_inputs("mixtral")
    with torch.no_grad():
        expected, got = dense(**inputs).logits, model(**inputs).logits
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-6


def test_standard_pruned_model_reproduces_the_reap_reference(reap_model):
    model, adapter, applied = reap_model
    standard = to_standard_model(model, adapter, applied)
    assert type(standard).__name__ == "MixtralForCausalLM"
    assert standard.config.num_local_experts == 3
    assert not any("projections" in name for name, _ in standard.named_parameters())
    inputs = model_inputs("mixtral")
    with torch.no_grad():
        expected, got = model(**inputs).logits, standard(**inputs).logits
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-6


def test_standard_merged_model_uses_the_dominant_router_rows():
    model = tiny_model("qwen2_moe")
    dense_router = [layer.block.gate.weight.detach().clone() for layer in adapter_for_config(model.config).moe_layers(model)]
    adapter = adapter_for_config(model.config)
    recipe = CompressionRecipe(experts=4, grouping="hc", max_calib_tokens=1024, calib_seq_len=32)
    applied = compress_loaded(model, adapter, calibration(), recipe, progress=False)
    standard = to_standard_model(model, adapter, applied)
    assert standard.config.num_experts == 4
    for router, layer, ours, built in zip(dense_router, adapter.moe_layers(standard), adapter.moe_layers(model),
                                          applied.layers):
        assert torch.equal(layer.block.gate.weight, router[built.grouping.dominant_experts])
        merged = ours.block.experts.projections
        expected = torch.cat([merged["gate"].weight, merged["up"].weight], dim=1)
        assert torch.equal(layer.block.experts.gate_up_proj, expected)
        assert torch.equal(layer.block.experts.down_proj, merged["down"].weight)
        # the shared expert is carried over as it is
        assert torch.equal(layer.block.shared_expert.up_proj.weight, ours.block.shared_expert.up_proj.weight)


def test_standard_checkpoint_loads_with_plain_transformers(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = CompressionRecipe(experts=4, grouping="reap", output_format="standard", max_calib_tokens=1024,
                               calib_seq_len=32)
    ours = compress_model(tiny_dirs["mixtral"], None, CompressionRecipe(**{**recipe.to_dict(), "output_format": "mcsmoe"}),
                          progress=False)
    assert ours.out_dir is None
    out = tmp_path / "standard"
    compress_model(tiny_dirs["mixtral"], out, recipe, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4 and "mcsmoe" not in config
    assert (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    reference_dir = tmp_path / "ours"
    compress_model(tiny_dirs["mixtral"], reference_dir, CompressionRecipe(**{**recipe.to_dict(), "output_format": "mcsmoe"}),
                   progress=False)
    section = json.loads((reference_dir / "config.json").read_text())["mcsmoe"]
    layer = next(iter(section["layers"].values()))
    assert layer["expert_to_group"] == [0, 1, 2, 3] and layer["router_rows"] == layer["dominant_experts"]
    reference = load_compressed(reference_dir)
    inputs = model_inputs("mixtral")
    with torch.no_grad():
        expected, got = reference(**inputs).logits, loaded(**inputs).logits
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-6
    # our pruned checkpoint exports too (validated against load_compressed): its blocks score the 4 kept
    # experts with 4 router rows, dense blocks that target ort writes as onnxruntime's MoE kernel
    from mcsmoe_deploy import export_model

    report = export_model(reference_dir, tmp_path / "reap.onnx", with_past=False, progress=False)
    assert report.custom_nodes.get("com.microsoft::MoE") == 2 and report.moe_nodes == 0
    assert report.max_rel_error < 1e-4


def test_router_calibration_trains_routers_only_and_lowers_the_kl():
    dense = tiny_model("mixtral")
    model = copy.deepcopy(dense)
    adapter = adapter_for_config(model.config)
    blocks = calibration()
    compress_loaded(model, adapter, blocks, CompressionRecipe(experts=3, max_calib_tokens=1024, calib_seq_len=32),
                    progress=False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def kl() -> float:
        with torch.no_grad():
            return float(kl_to_teacher(model(input_ids=blocks).logits, dense(input_ids=blocks).logits))

    kl_before = kl()
    report = calibrate_routers(model, dense, adapter, blocks, steps=30, lr=3e-2, batch_size=4, progress=False)
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"{layer.name}.gate.weight" for layer in adapter.moe_layers(model)}
    assert report.steps == 30 and kl() < 0.99 * kl_before
    assert not any(p.requires_grad for p in model.parameters())


def test_router_calibration_of_a_standard_model_keeps_expert_weights(reap_model):
    model, adapter, applied = reap_model
    standard = to_standard_model(model, adapter, applied)
    experts = {name: t.clone() for name, t in standard.state_dict().items() if ".experts." in name}
    calibrate_routers(standard, tiny_model("mixtral"), adapter, calibration(), steps=3, batch_size=2, progress=False)
    assert all(torch.equal(t, standard.state_dict()[name]) for name, t in experts.items())


def test_standard_format_refusals(tiny_dirs, tmp_path):
    with pytest.raises(ParameterError, match="layer-adaptive G"):
        CompressionRecipe(adaptive=True, output_format="standard").validate()
    with pytest.raises(ParameterError, match="low-rank"):
        CompressionRecipe(rank_ratio=0.5, output_format="standard").validate()
    with pytest.raises(ParameterError, match="quantized"):
        CompressionRecipe(quantize="int4", output_format="standard").validate()
    with pytest.raises(UserError, match="not available for the switch_transformers family"):
        compress_model(tiny_dirs["switch_transformers"], tmp_path / "x", CompressionRecipe(output_format="standard"),
                       progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_standard_checkpoint_exports_to_onnxruntime_moe(tiny_dirs, tmp_path, capsys):
    import onnx
    from transformers import AutoModelForCausalLM

    from mcsmoe_deploy.cli import main

    standard = tmp_path / "standard"
    argv = ["compress", str(tiny_dirs["mixtral"]), str(standard), "--experts", "4", "--grouping", "hc", "--format",
            "standard", "--calibrate-router", "--router-steps", "2", "--max-calib-tokens", "512", "--quiet"]
    assert main(argv) == 0
    assert "router calibration: 2 steps" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(standard)
    assert loaded.config.num_local_experts == 4 and loaded.config.mcsmoe_standard["family"] == "mixtral"
    out = tmp_path / "fused.onnx"
    assert main(["export", str(standard), str(out), "--target", "ort-fused", "--no-past", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "com.microsoft::MoE x2" in printed
    moe = [n for n in onnx.load(out).graph.node if n.op_type == "MoE"]
    weights = {i.name: i for i in onnx.load(out).graph.initializer}
    assert len(moe) == 2 and list(weights[moe[0].input[2]].dims)[0] == 4  # fc1 weights of 4 experts


@pytest.mark.parametrize("family", ["switch_transformers", "olmoe"])
def test_pruned_checkpoint_reloads_with_kept_router_rows(family, tiny_dirs, tmp_path):
    recipe = CompressionRecipe(experts=5, grouping="reap", max_calib_tokens=1024, calib_seq_len=32)
    out = tmp_path / "reap"
    compress_model(tiny_dirs[family], out, recipe, progress=False)
    reloaded = load_compressed(out)
    adapter = adapter_for_config(reloaded.config)
    section = json.loads((out / "config.json").read_text())["mcsmoe"]
    model = tiny_model(family)
    dense_layers = adapter.moe_layers(model)
    for layer, dense_layer in zip(adapter.moe_layers(reloaded), dense_layers):
        rows = section["layers"][layer.name]["router_rows"]
        assert len(rows) == 5 and torch.equal(adapter.router_weight(layer.block),
                                              adapter.router_weight(dense_layer.block)[rows])
    compress_loaded(model, adapter, calibration(), recipe, progress=False)
    inputs = model_inputs(family)
    with torch.no_grad():
        expected, got = model(**inputs).logits, reloaded(**inputs).logits
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5
