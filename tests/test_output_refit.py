"""The output refit (recipe output_refit): closed-form least squares of the merged / kept experts' down
projections, exact where nothing was lost, the same checkpoint format, clean errors."""

import copy
import json

import pytest
import torch

from conftest import EXPERTS, model_inputs, tiny_model
from mcsmoe_deploy import (
    CompressionRecipe,
    adapter_for_config,
    apply_plan,
    collect_routing_stats,
    compressed_group_weights,
    compress_model,
    dense_block_output,
    expert_hidden,
    plan_compression,
    refit_output_projections,
    routing_weights,
)
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.errors import ParameterError
from mcsmoe_deploy.models import Routing
from test_cli_errors import FAST, assert_nothing_written, assert_one_error_line, run
from test_pipeline import calibration


def compressed(model, recipe, blocks):
    """A compressed copy of `model` by `recipe`, statistics from `blocks`."""
    adapter = adapter_for_config(model.config)
    stats = collect_routing_stats(model, adapter, blocks, progress=False, keep_inputs=recipe.calibration_inputs,
                                  expert_outputs=recipe.needs_expert_outputs)
    plan = plan_compression(stats, EXPERTS, recipe, adapter.family)
    out = copy.deepcopy(model)
    apply_plan(out, adapter, plan, recipe, progress=False)
    return out, stats


@pytest.mark.parametrize("family, ridge", [("mixtral", 1e-2), ("mixtral", 10.0), ("qwen2_moe", 1e-2),
                                           ("switch_transformers", 1e-2)])
def test_one_expert_per_group_is_left_unchanged(family, ridge):
    # G = E: the merged block is the dense block, so the ridge (pulling towards the merged weights)
    # cannot move the refit away from it, whatever its weight (a shared expert, wi/wo experts and
    # one-hot dispatch too)
    model = tiny_model(family)
    blocks = calibration()
    plain, _ = compressed(model, CompressionRecipe(experts=EXPERTS), blocks)
    refit, _ = compressed(model, CompressionRecipe(experts=EXPERTS, output_refit=True, refit_ridge=ridge), blocks)
    for (name, a), (_, b) in zip(plain.state_dict().items(), refit.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    inputs = model_inputs(family)
    with torch.no_grad():
        dense_logits, refit_logits = model(**inputs).logits, refit(**inputs).logits
    assert (dense_logits - refit_logits).abs().max() < 1e-4


def test_refit_is_the_least_squares_solution():
    # hand-made layer: 4 experts in 2 groups, top-2 renormalised; with a negligible ridge the refit equals
    # lstsq on the stacked features, and it lowers the block's error on its calibration tokens
    torch.manual_seed(3)
    from mcsmoe_deploy.models import ExpertLayout

    layout = ExpertLayout(gated=True, activation="silu", hidden_size=6, intermediate_size=5)
    experts = [{"gate": torch.randn(5, 6), "up": torch.randn(5, 6), "down": torch.randn(6, 5)} for _ in range(4)]
    merged = [{k: (experts[0][k] + experts[1][k]) / 2 for k in experts[0]},
              {k: (experts[2][k] + experts[3][k]) / 2 for k in experts[0]}]
    routing = Routing(top_k=2, renormalize=True)
    x = torch.randn(400, 6)
    logits = torch.randn(400, 4, dtype=torch.float64)
    assigned = torch.topk(logits, 2, dim=-1).indices
    to_group = [0, 0, 1, 1]
    fitted = refit_output_projections(experts, merged, (x, logits, assigned), routing, to_group, None, layout,
                                      ridge=1e-12)
    xd = x.double()
    target = dense_block_output(experts, xd, assigned, routing_weights(logits, assigned, routing), layout)
    weight = compressed_group_weights(logits, assigned, routing, to_group, None)
    features = torch.cat([weight[:, g, None] * expert_hidden(merged[g], xd, layout) for g in range(2)], dim=1)
    expected = torch.linalg.lstsq(features, target).solution  # [2F, H]
    got = torch.cat([m["down"].double().T for m in fitted])
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    for g in range(2):  # gate and up untouched
        assert torch.equal(fitted[g]["gate"], merged[g]["gate"]) and torch.equal(fitted[g]["up"], merged[g]["up"])

    def error(downs):
        return float(((features @ torch.cat([d.double().T for d in downs]) - target) ** 2).mean())

    before, after = error([m["down"] for m in merged]), error([m["down"] for m in fitted])
    assert after < 0.85 * before  # 0.83 here: random experts are far apart, a merge keeps little of them


def test_pruned_routing_is_top_k_over_the_kept_rows():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    assigned = torch.tensor([[0, 1], [3, 2]])
    # experts 1 and 2 kept (groups 0 and 1): both tokens now pick both of them
    weight = compressed_group_weights(logits, assigned, Routing(2, True), [0, 1], router_rows=[1, 2])
    e = torch.exp(torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(weight, torch.tensor([[e / (1 + e), 1 / (1 + e)], [1 / (1 + e), e / (1 + e)]]))


def test_refit_keeps_the_checkpoint_format(tmp_path):
    from conftest import save_tiny

    source = save_tiny("mixtral", tmp_path / "dense")
    plain = compress_model(source, tmp_path / "plain", CompressionRecipe(experts=2, grouping="reap", max_calib_tokens=2048),
                           progress=False)
    refit = compress_model(source, tmp_path / "refit", CompressionRecipe(experts=2, grouping="reap", max_calib_tokens=2048,
                                                                         output_refit=True), progress=False)
    from safetensors.torch import load_file

    a, b = load_file(plain.out_dir / "model.safetensors"), load_file(refit.out_dir / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed and all(".projections.down." in k for k in changed), changed
    config = json.loads((refit.out_dir / "config.json").read_text())
    assert config["mcsmoe"]["recipe"]["output_refit"] is True
    assert config["mcsmoe"]["layers"] == json.loads((plain.out_dir / "config.json").read_text())["mcsmoe"]["layers"]


def test_refit_size_is_checked_up_front():
    from mcsmoe_deploy import check_refit_size

    check_refit_size(4, 144)
    with pytest.raises(ParameterError, match=r"^output_refit would solve for 4 x 14336 hidden neurons per layer at "
                                             r"once \(24 GiB\); it is for models whose G x intermediate size is at "
                                             r"most 23170$"):
        check_refit_size(4, 14336)


@pytest.mark.parametrize("extra, needle", [
    (["--refit-ridge", "0.1"], "--refit-ridge needs --output-refit"),
    (["--refit-tokens", "100"], "--refit-tokens needs --output-refit"),
    (["--output-refit", "--refit-ridge", "0"], "--refit-ridge must be a positive finite number, not 0.0"),
    (["--output-refit", "--refit-tokens", "0"], "--refit-tokens must be at least 1, not 0"),
])
def test_bad_refit_options_are_one_line(extra, needle, tiny_dirs, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, ["compress", tiny_dirs["mixtral"], out_dir, *FAST, *extra])
    assert_one_error_line(code, err, [needle])
    assert_nothing_written(out_dir)
