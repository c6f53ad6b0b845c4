"""GPTQ (compress/gptq.py): exact properties on hand-made data, the input moments it fits to, and the
checkpoint it writes (same format: reloads and exports to the same logits)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mcsmoe_deploy as m
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.compress import ExpertInputMoments, gptq_projection, gptq_quantize
from mcsmoe_deploy.checkpoint import compressed_layers
from mcsmoe_deploy.grouped_experts import GroupedProjection, ProjectionSpec
from mcsmoe_deploy.quantization import QuantSpec, dequantize, quantize

from conftest import model_inputs

SPECS = [QuantSpec(4, 16, True), QuantSpec(4, 32, False), QuantSpec(8, 16, True), QuantSpec(8, 16, False)]
FAST = dict(experts=4, max_calib_tokens=1024, calib_seq_len=32, quant_block=16)


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs x [n, dim] whose channels are strongly correlated (a random mix of few factors, plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 8, generator=generator)
    return factors @ torch.randn(8, dim, generator=generator) + 0.05 * torch.randn(n, dim, generator=generator)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within `rel` of the largest entry (the moments are float32 products summed in float64)."""
    assert float((got - want).abs().max()) <= rel * float(want.abs().max())


def output_error(x: torch.Tensor, weight: torch.Tensor, restored: torch.Tensor) -> float:
    return float((x.double() @ (weight.double() - restored.double()).T).norm())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.block}-{'sym' if s.symmetric else 'asym'}")
def test_with_a_diagonal_hessian_gptq_is_round_to_nearest_bit_for_bit(spec):
    # uncorrelated inputs: the inverse's Cholesky factor is diagonal, no error is fed to other columns
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 64, generator=generator)
    for hessian in (torch.diag(torch.rand(64, generator=generator) + 0.1), torch.eye(64), torch.zeros(64, 64)):
        got, want = gptq_quantize(weight, hessian, spec), quantize(weight, spec)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        assert (got.zero_points is None) == spec.symmetric
        assert spec.symmetric or torch.equal(got.zero_points, want.zero_points)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.block}-{'sym' if s.symmetric else 'asym'}")
def test_gptq_lowers_the_output_error_on_correlated_inputs(spec):
    x = correlated_inputs(512, 64)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    got, rtn = gptq_quantize(weight, x.T @ x, spec), quantize(weight, spec)
    assert output_error(x, weight, got.dequantize()) < 0.8 * output_error(x, weight, rtn.dequantize())
    # codes in range: symmetric leaves the most negative code unused
    low = 1 if spec.symmetric else 0
    assert got.codes.dtype == torch.uint8 and int(got.codes.min()) >= low and int(got.codes.max()) <= spec.max_code
    assert got.scales.shape == (32, 64 // spec.block) and got.scales.dtype == torch.float32
    # the same stored form as round to nearest: packed codes round-trip through the stored-form dequantize
    stored = m.quantization.dequantize_stored(spec, got.packed_codes(), got.scales, got.zero_points)
    assert torch.equal(stored, dequantize(got))


def test_a_scale_of_the_hessian_changes_nothing_and_bad_shapes_are_refused():
    x = correlated_inputs(256, 32, seed=3)
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    spec = QuantSpec(4, 16)
    once, scaled = gptq_quantize(weight, x.T @ x, spec), gptq_quantize(weight, 1000.0 * (x.T @ x), spec)
    assert torch.equal(once.codes, scaled.codes)
    with pytest.raises(ValueError, match=r"hessians of shape \[1, 16, 16\] for weights \[1, 8, 32\]"):
        gptq_quantize(weight, torch.eye(16), spec)


def test_low_rank_factors_fit_their_own_inputs():
    """R is fitted to x, L to the quantized R's output; the projection's output error drops."""
    spec = ProjectionSpec(48, 64, rank=16, sparse_rows=2)
    projection = GroupedProjection(2, spec)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tensor in (projection.left, projection.right, projection.sparse_values):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        projection.sparse_rows.copy_(torch.tensor([[0, 7], [3, 47]]))
    x = correlated_inputs(512, 64, seed=6)
    quant = QuantSpec(4, 16)
    gptq = gptq_projection(projection, quant, torch.stack([x.T @ x, x.T @ x]).double())
    rtn = projection.quantized(quant)
    with torch.no_grad():
        for group in range(2):
            want = projection(x, group)
            assert float((gptq(x, group) - want).norm()) < 0.8 * float((rtn(x, group) - want).norm())
            # sparse rows are copied as they are
            assert torch.equal(gptq.sparse_values[group], projection.sparse_values[group])
    assert gptq.spec == rtn.spec and [t.shape for t in gptq.tensors()] == [t.shape for t in rtn.tensors()]


def test_input_moments_are_the_routed_tokens_second_moments(tiny_dirs):
    """Layer 0's moments: per group, the sum of x x^T over the block inputs routed to it (gate/up) and of
    the group's hidden activations (down), from one pass that keeps every input."""
    recipe = m.CompressionRecipe(**FAST)
    source = m.CalibratedModel(tiny_dirs["mixtral"], recipe, progress=False)
    stats = m.collect_routing_stats(source.model, source.adapter, source.blocks, progress=False, keep_inputs=10**6)
    compressed = source.compress()
    experts = compressed_layers(compressed.model)[0]
    moments = ExpertInputMoments(compressed.model, source.adapter, source.blocks, progress=False)(0, experts)
    assert moments["gate"] is moments["up"]
    inputs, assigned = stats.layers[0].samples()
    assert len(inputs) == source.blocks.numel()
    groups = experts.expert_to_group[assigned]
    for group in range(experts.num_groups):
        x = inputs[(groups == group).any(dim=-1)].double()
        assert len(x) >= 32
        assert_close_to_scale(moments["gate"][group], x.T @ x)
        with torch.no_grad():
            hidden = experts.hidden_activations(x.float(), group).double()
        assert_close_to_scale(moments["down"][group], hidden.T @ hidden)
    # weighted by the routing: the sum of w^2 x x^T, w the token's routing weight in the group
    weighted = ExpertInputMoments(compressed.model, source.adapter, source.blocks, progress=False,
                                  routing_weighted=True)(0, experts)
    with torch.no_grad():
        _, weights, picks = compressed.model.model.layers[0].mlp.gate(inputs)  # Mixtral's router
    assert torch.equal(picks, assigned)
    for group in range(experts.num_groups):
        mine = groups == group
        w = (weights * mine).sum(dim=-1)[mine.any(dim=-1)]
        x = inputs[mine.any(dim=-1)].double() * w[:, None].double()
        assert_close_to_scale(weighted["gate"][group], x.T @ x, rel=1e-4)
    # a group seeing fewer tokens than min_tokens is rounded to nearest: the identity
    few = ExpertInputMoments(compressed.model, source.adapter, source.blocks, progress=False, min_tokens=10**6)
    assert torch.equal(few(0, experts)["down"][1], torch.eye(experts.projections["down"].spec.in_features).double())


@pytest.mark.parametrize("family,low_rank", [("mixtral", False), ("mixtral", True), ("switch_transformers", False)],
                         ids=["mixtral-merged", "mixtral-lowrank", "switch-merged"])
def test_gptq_checkpoint_reloads_to_the_same_logits_and_exports_to_them(family, low_rank, tiny_dirs, tmp_path):
    extra = dict(rank_ratio=0.5, sparse_keep=0.1, quant_symmetric=False) if low_rank else {}
    recipe = m.CompressionRecipe(quantize="int4", quant_method="gptq", **FAST, **extra)
    source = m.CalibratedModel(tiny_dirs[family], recipe, progress=False)
    compressed = source.compress()
    unquantized = copy.deepcopy(compressed)
    source.quantize(compressed)
    out = source.save(compressed, tmp_path / "gptq")
    section = json.loads((out / "config.json").read_text())["mcsmoe"]
    assert section["recipe"]["quant_method"] == "gptq"
    reloaded = m.load_compressed(out)
    inputs = model_inputs(family)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, compressed.model(**inputs).logits)
    # the codes are not round to nearest's
    rtn = copy.deepcopy(unquantized)
    m.quantize_experts(rtn.model, rtn.applied, recipe.quant_spec)  # no input moments: round to nearest
    factor = "right" if low_rank else "weight"
    name = compressed_layers(compressed.model)[0].layout.output_projections[0]  # down, or wo
    gptq_codes = getattr(compressed_layers(compressed.model)[0].projections[name], f"{factor}_codes")
    rtn_codes = getattr(compressed_layers(rtn.model)[0].projections[name], f"{factor}_codes")
    assert not torch.equal(gptq_codes, rtn_codes)
    if low_rank:  # the exported graph computes what the checkpoint does (prefill and decode, 1e-4 relative)
        report = m.export_model(out, tmp_path / "model.onnx")
        assert len(report.parity) == 1 and report.parity[0].with_past and report.parity[0].max_rel_error < 1e-4


def test_the_cli_records_the_method_and_refuses_an_unknown_one(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "rtn"
    argv = ["compress", str(tiny_dirs["mixtral"]), str(out), "--experts", "4", "--max-calib-tokens", "1024",
            "--quantize", "int4", "--quant-block", "16", "--quiet"]
    assert main(argv + ["--quant-method", "rtn"]) == 0
    assert json.loads((out / "config.json").read_text())["mcsmoe"]["recipe"]["quant_method"] == "rtn"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv[:2] + [str(tmp_path / "bad")] + argv[3:] + ["--quant-method", "awq"])
    assert exited.value.code == 2
    assert "argument --quant-method: invalid choice: 'awq'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_gptq_without_quantize_is_one_line_and_writes_nothing(tiny_dirs, tmp_path, capsys):
    assert m.CompressionRecipe(quantize="int4").quant_method == "rtn"  # the default
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dirs["mixtral"]), str(out), "--quiet", "--quant-method", "gptq"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mcsmoe: error: --quant-method gptq needs quantize int4 or int8"]
    assert not out.exists()
