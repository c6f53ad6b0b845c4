"""Shared-basis low rank (--low-rank-basis shared): the factorisation, the checkpoint, the op body, the graph."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import mcsmoe_deploy as m
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.compress import CalibratedModel
from mcsmoe_deploy.compress.lowrank import low_rank_sparse, rank_for_ratio
from mcsmoe_deploy.compress.shared_basis import shared_basis, shared_rank_for_ratio
from mcsmoe_deploy.contract import SHARED_BASIS_OP_VERSION
from mcsmoe_deploy.exporters import MoEOpSpec
from mcsmoe_deploy.grouped_experts import GroupedLowRankExperts, ProjectionSpec
from mcsmoe_deploy.models.base import ExpertLayout

from moe_body_checks import (assert_body_matches_module, assert_reloads_and_stands_for_dense, exported_moe_functions,
                             randomize)

FAST = dict(max_calib_tokens=1024, calib_seq_len=32)
SHARED = dict(experts=4, rank_ratio=0.5, low_rank_basis="shared", **FAST)


def _moments(groups: int, size: int, seed: int) -> list[torch.Tensor]:
    """Per group a random full-rank input second moment [size, size], far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(64, size, generator=gen) * torch.linspace(0.1, 3, size) for _ in range(groups)]
    return [x.T @ x / len(x) for x in xs]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("whitened", [False, True])
def test_experts_in_one_subspace_are_exact_at_its_dimension(side, whitened):
    groups, out, inputs, dim = 4, 24, 20, 5
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(dim, inputs, generator=gen) if side == "right" else torch.randn(out, dim, generator=gen)
    own = (out, dim) if side == "right" else (dim, inputs)
    weights = [torch.randn(own, generator=gen) @ basis if side == "right" else basis @ torch.randn(own, generator=gen)
               for _ in range(groups)]
    moments = _moments(groups, inputs, 1) if whitened else None
    fitted = shared_basis(weights, dim, side, input_moments=moments)
    assert tuple(fitted.shared.shape) == ((dim, inputs) if side == "right" else (out, dim))
    for g, weight in enumerate(weights):
        assert (fitted.dense(g) - weight).abs().max() < 1e-4 * weight.abs().max()
    # per-expert SVD at the same bytes has a smaller rank and cannot be exact
    stored = dim * (inputs + groups * out) if side == "right" else dim * (out + groups * inputs)
    per_expert = rank_for_ratio(out, inputs, stored / (groups * out * inputs))
    assert per_expert < dim
    assert (low_rank_sparse(weights[0], per_expert, 0).dense() - weights[0]).abs().max() > 1e-2


def test_shared_rank_spends_the_per_expert_bytes():
    out, inputs, groups, ratio = 48, 32, 4, 0.5
    per_expert = groups * rank_for_ratio(out, inputs, ratio) * (out + inputs)
    for side in ("right", "left"):
        rank = shared_rank_for_ratio(out, inputs, groups, side, ratio)
        spec = ProjectionSpec(out, inputs, rank, shared=side)
        stored = spec.stored_parameters(groups)
        assert stored <= groups * ratio * out * inputs and stored > per_expert  # the budget, and more rank
        assert stored + (inputs if side == "right" else out) + groups * (out if side == "right" else inputs) > \
            groups * ratio * out * inputs  # one more rank would not fit
    assert shared_rank_for_ratio(out, inputs, groups, "right", 1.0) is None


@pytest.mark.parametrize("strategy, gated", [("gather_tokens", True), ("loop_tokens", True), ("gather_tokens", False)])
@pytest.mark.parametrize("tokens", [1, 17])
def test_function_body_matches_reference(strategy, gated, tokens):
    layout = ExpertLayout(gated, "silu" if gated else "relu", 16, 24)
    shapes = {name: layout.projection_shape(name) for name in layout.projections}
    if gated:  # shared right with sparse rows, an ordinary low-rank projection, shared left with sparse rows
        specs = {"gate": ProjectionSpec(*shapes["gate"], 6, 2, shared="right"), "up": ProjectionSpec(*shapes["up"], 5),
                 "down": ProjectionSpec(*shapes["down"], 7, 3, shared="left")}
    else:
        specs = {"wi": ProjectionSpec(*shapes["wi"], 6, shared="right"),
                 "wo": ProjectionSpec(*shapes["wo"], 7, 3, shared="left")}
    module = GroupedLowRankExperts(layout, [0, 1, 2, 0, 1, 2], specs).eval()
    gen = torch.Generator().manual_seed(0)
    randomize(module, gen)
    first = layout.projections[0]
    assert tuple(module.projections[first].right.shape) == (6, 16) and module.projections[first].num_groups == 3
    spec = MoEOpSpec.from_experts(module, 2, "softmax_topk_norm")
    assert spec.version == SHARED_BASIS_OP_VERSION
    assert ("gate-lowrank-sparse-sharedright" if gated else "wi-lowrank-sharedright") in spec.overload
    assert_body_matches_module(module, spec, strategy, tokens, gen)


@pytest.mark.parametrize("low_rank", ["svd", "activation-aware"])
def test_checkpoint_stores_one_basis_and_reloads_to_the_same_logits(low_rank, tiny_dirs, tmp_path):
    recipe = m.CompressionRecipe(sparse_keep=0.1, low_rank=low_rank, **SHARED)
    source = CalibratedModel(tiny_dirs["mixtral"], recipe, progress=False)
    compressed = source.compress(recipe)
    out = source.save(compressed, tmp_path / "out")
    section = json.loads((out / "config.json").read_text())["mcsmoe"]
    assert section["format_version"] == 2 and section["recipe"]["low_rank_basis"] == "shared"
    sides = {name: spec["shared"] for layer in section["layers"].values()
             for name, spec in layer["projections"].items()}
    assert sides == {"gate": "right", "up": "right", "down": "left"}
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        gate_right = weights.get_tensor(next(n for n in names if n.endswith("projections.gate.right")))
        down_left = weights.get_tensor(next(n for n in names if n.endswith("projections.down.left")))
        gate_left = weights.get_tensor(next(n for n in names if n.endswith("projections.gate.left")))
    assert gate_right.dim() == 2 and down_left.dim() == 2 and gate_left.dim() == 3  # one basis, G coefficients
    assert_reloads_and_stands_for_dense(compressed, out)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_exported_graph_matches_load_compressed(family, tiny_dirs, tmp_path):
    sparse = 0.1 if family == "mixtral" else 0.0
    low_rank = "activation-aware" if family in ("mixtral", "olmoe") else "svd"
    recipe = m.CompressionRecipe(sparse_keep=sparse, low_rank=low_rank, **SHARED)
    # target portable too (its standard-op attention), for one family
    targets = ("ort", "portable") if family == "mixtral" else ("ort",)
    functions = exported_moe_functions(tiny_dirs[family], recipe, tmp_path, SHARED_BASIS_OP_VERSION, targets)
    assert functions and all("sharedright" in f.overload and "sharedleft" in f.overload for f in functions)


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int4", "--quant-block", "16"],
     "--low-rank-basis shared bases are stored float; quantize per-expert factors instead"),
    (["--rank-energy", "0.9"], "--low-rank-basis shared takes its rank from rank_ratio, not rank_energy"),
])
def test_shared_basis_refusals_are_one_line_and_write_nothing(extra, message, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", str(tiny_dirs["mixtral"]), str(out), "--low-rank-basis", "shared", "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()
