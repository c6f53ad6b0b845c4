"""Base-delta low rank (--low-rank-basis base-delta): the fit, equal bytes, the op body, checkpoint and graph."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import mcsmoe_deploy as m
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.compress import CalibratedModel
from mcsmoe_deploy.compress.base_delta import base_delta, base_delta_rank_for_ratio
from mcsmoe_deploy.contract import BASE_DELTA_OP_VERSION
from mcsmoe_deploy.errors import ParameterError
from mcsmoe_deploy.exporters import MoEOpSpec
from mcsmoe_deploy.grouped_experts import GroupedLowRankExperts, ProjectionSpec
from mcsmoe_deploy.models.base import ExpertLayout

from moe_body_checks import (assert_body_matches_module, assert_reloads_and_stands_for_dense, exported_moe_functions,
                             randomize)

FAST = dict(max_calib_tokens=1024, calib_seq_len=32)
BASE_DELTA = dict(experts=4, rank_ratio=0.5, low_rank_basis="base-delta", **FAST)


def _moment(size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, size, generator=gen) * torch.linspace(0.1, 3, size)
    return x.T @ x / len(x)


@pytest.mark.parametrize("whitened", [False, True])
def test_experts_a_rank_r_step_from_their_mean_are_exact_at_rank_r(whitened):
    out, inputs, rank = 24, 20, 3
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(out, inputs, generator=gen)
    step = torch.randn(out, rank, generator=gen) @ torch.randn(rank, inputs, generator=gen)
    weights = [base + step, base - step]  # equal frequencies: their mean is the base
    moments = [_moment(inputs, 1), _moment(inputs, 2)] if whitened else None
    fitted = base_delta(weights, rank, input_moments=moments, frequencies=[0.3, 0.3])
    assert (fitted.base - base).abs().max() < 1e-5
    for g, weight in enumerate(weights):
        assert (fitted.dense(g) - weight).abs().max() < 1e-4 * weight.abs().max()
    # the base follows the routing: a group seen three times as often pulls it three times as hard
    skewed = base_delta(weights, rank, frequencies=[0.75, 0.25])
    assert torch.allclose(skewed.base, base + 0.5 * step, atol=1e-5)


def test_identical_experts_keep_their_function_with_zero_deltas():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 12, generator=gen)
    fitted = base_delta([weight] * 4, 2, frequencies=[0.1, 0.2, 0.3, 0.4])
    assert torch.allclose(fitted.base, weight, atol=1e-6)
    assert fitted.left.abs().max() * fitted.right.abs().max() < 1e-10


def test_rank_spends_the_per_expert_bytes_and_refuses_a_budget_the_base_fills():
    out, inputs, groups, ratio = 48, 32, 8, 0.3
    rank = base_delta_rank_for_ratio(out, inputs, groups, ratio)
    stored = ProjectionSpec(out, inputs, rank, shared="base").stored_parameters(groups)
    budget = ratio * groups * out * inputs
    assert rank == 3 and stored == out * inputs + groups * rank * (out + inputs)
    assert stored <= budget < stored + groups * (out + inputs)  # one more rank would not fit
    with pytest.raises(ParameterError, match=r"rank_ratio 0.125 leaves no room for deltas beside the base with 8 groups"):
        base_delta_rank_for_ratio(out, inputs, groups, 0.125)


@pytest.mark.parametrize("strategy, gated", [("gather_tokens", True), ("loop_tokens", True), ("gather_tokens", False)])
@pytest.mark.parametrize("tokens", [1, 17])
def test_function_body_matches_reference(strategy, gated, tokens):
    layout = ExpertLayout(gated, "silu" if gated else "relu", 16, 24)
    shapes = {name: layout.projection_shape(name) for name in layout.projections}
    if gated:  # base-delta with sparse rows, an ordinary low-rank projection, base-delta without
        specs = {"gate": ProjectionSpec(*shapes["gate"], 6, 2, shared="base"), "up": ProjectionSpec(*shapes["up"], 5),
                 "down": ProjectionSpec(*shapes["down"], 7, shared="base")}
    else:
        specs = {"wi": ProjectionSpec(*shapes["wi"], 6, shared="base"),
                 "wo": ProjectionSpec(*shapes["wo"], 7, 3, shared="base")}
    module = GroupedLowRankExperts(layout, [0, 1, 2, 0, 1, 2], specs).eval()
    gen = torch.Generator().manual_seed(0)
    randomize(module, gen)
    first = layout.projections[0]
    assert tuple(module.projections[first].base.shape) == (24, 16) and module.projections[first].num_groups == 3
    spec = MoEOpSpec.from_experts(module, 2, "softmax_topk_norm")
    assert spec.version == BASE_DELTA_OP_VERSION == 4
    assert ("gate-lowrank-sparse-sharedbase" if gated else "wi-lowrank-sharedbase") in spec.overload
    assert spec.projection_inputs(first)[:3] == (f"{first}_left", f"{first}_right", f"{first}_base")
    assert_body_matches_module(module, spec, strategy, tokens, gen)


@pytest.mark.parametrize("low_rank", ["svd", "activation-aware"])
def test_checkpoint_stores_one_base_and_reloads_to_the_same_logits(low_rank, tiny_dirs, tmp_path):
    recipe = m.CompressionRecipe(sparse_keep=0.1, low_rank=low_rank, **BASE_DELTA)
    source = CalibratedModel(tiny_dirs["mixtral"], recipe, progress=False)
    compressed = source.compress(recipe)
    out = source.save(compressed, tmp_path / "out")
    section = json.loads((out / "config.json").read_text())["mcsmoe"]
    assert section["format_version"] == 3 and section["recipe"]["low_rank_basis"] == "base-delta"
    assert {spec["shared"] for layer in section["layers"].values() for spec in layer["projections"].values()} == {"base"}
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        gate_base = weights.get_tensor(next(n for n in names if n.endswith("projections.gate.base")))
        gate_left = weights.get_tensor(next(n for n in names if n.endswith("projections.gate.left")))
    assert gate_base.dim() == 2 and gate_left.dim() == 3  # one base, G deltas
    assert_reloads_and_stands_for_dense(compressed, out)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_exported_graph_matches_load_compressed(family, tiny_dirs, tmp_path):
    sparse = 0.1 if family == "mixtral" else 0.0
    low_rank = "activation-aware" if family in ("mixtral", "olmoe") else "svd"
    recipe = m.CompressionRecipe(sparse_keep=sparse, low_rank=low_rank, **BASE_DELTA)
    # target portable too (its standard-op attention), for one family
    targets = ("ort", "portable") if family == "mixtral" else ("ort",)
    functions = exported_moe_functions(tiny_dirs[family], recipe, tmp_path, BASE_DELTA_OP_VERSION, targets)
    assert functions and all("sharedbase" in f.overload for f in functions)


@pytest.mark.parametrize("extra, message", [
    (["--rank-ratio", "0.25", "--experts", "4"],
     "--rank-ratio 0.25 leaves no room for deltas beside the base with 4 groups (base-delta needs 1/G < rank_ratio < 1)"),
    (["--rank-ratio", "0.5", "--quantize", "int4", "--quant-block", "16"],
     "--low-rank-basis base-delta bases are stored float; quantize per-expert factors instead"),
])
def test_base_delta_refusals_are_one_line_and_write_nothing(extra, message, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", str(tiny_dirs["mixtral"]), str(out), "--low-rank-basis", "base-delta", "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message) and "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_recovery_rate_defaults_low_for_base_delta_and_follows_distill_lr():
    base_delta_recipe = m.CompressionRecipe(rank_ratio=0.3, low_rank_basis="base-delta")
    assert base_delta_recipe.distill_learning_rate == 1e-4
    assert m.CompressionRecipe(rank_ratio=0.3, low_rank_basis="shared").distill_learning_rate == 1e-3
    assert m.CompressionRecipe(rank_ratio=0.3, low_rank_basis="base-delta", distill_lr=3e-4).distill_learning_rate == 3e-4
    assert m.CompressionRecipe(low_rank_basis="base-delta").distill_learning_rate == 3e-4  # merge only


def test_a_shared_base_or_basis_counts_whole_in_the_bytes_a_token_reads(tiny_dirs):
    model, adapter = m.load_model(tiny_dirs["mixtral"])
    stem = "model.layers.0.mlp.experts.projections"
    assert adapter.token_read_share(f"{stem}.gate.base", [24, 16], model.config) == 1.0
    assert adapter.token_read_share(f"{stem}.gate.right", [6, 16], model.config) == 1.0  # a shared basis
    assert adapter.token_read_share(f"{stem}.gate.left", [4, 24, 6], model.config) == 0.5  # k = 2 of 4 groups
    assert adapter.token_read_share(f"{stem}.gate.sparse_rows", [4, 3], model.config) == 0.5
