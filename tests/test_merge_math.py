"""Alignment, merging and low-rank compression on hand-made and random weights."""

import pytest
import torch

from mcsmoe_deploy import ExpertLayout, UserError
from mcsmoe_deploy.compress import (
    align_to,
    alignment_permutation,
    low_rank_sparse,
    merge_experts,
    merge_layer,
    permute_expert,
    rank_for_energy,
    rank_for_ratio,
    sparse_row_count,
)
from mcsmoe_deploy.compress.grouping import LayerGrouping

GATED = ExpertLayout(gated=True, activation="silu", hidden_size=16, intermediate_size=24)
PLAIN = ExpertLayout(gated=False, activation="relu", hidden_size=16, intermediate_size=24)


def random_expert(layout: ExpertLayout, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*layout.projection_shape(name), generator=generator) for name in layout.projections}


def run_expert(expert: dict, layout: ExpertLayout, x: torch.Tensor) -> torch.Tensor:
    if layout.gated:
        return (torch.nn.functional.silu(x @ expert["gate"].T) * (x @ expert["up"].T)) @ expert["down"].T
    return torch.relu(x @ expert["wi"].T) @ expert["wo"].T


@pytest.mark.parametrize("layout", [GATED, PLAIN], ids=["gated", "plain"])
def test_alignment_is_function_preserving(layout):
    reference, member = random_expert(layout, 0), random_expert(layout, 1)
    x = torch.randn(32, layout.hidden_size, generator=torch.Generator().manual_seed(2))
    aligned = align_to(reference, member, layout)
    expected = run_expert(member, layout, x)
    assert not torch.equal(aligned[layout.projections[0]], member[layout.projections[0]])  # it did permute
    assert float((run_expert(aligned, layout, x) - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize("layout", [GATED, PLAIN], ids=["gated", "plain"])
def test_alignment_recovers_a_hidden_permutation(layout):
    reference = random_expert(layout, 0)
    shuffle = torch.randperm(layout.intermediate_size, generator=torch.Generator().manual_seed(3))
    shuffled = permute_expert(reference, shuffle, layout)
    permutation = alignment_permutation(reference, shuffled, layout)
    restored = permute_expert(shuffled, permutation, layout)
    for name in layout.projections:
        assert torch.equal(restored[name], reference[name])


def test_merge_uses_frequency_weights():
    a = {"w": torch.full((2, 2), 1.0)}
    b = {"w": torch.full((2, 2), 4.0)}
    c = {"w": torch.full((2, 2), 10.0)}
    merged = merge_experts([a, b, c], [0.5, 0.25, 0.25])
    assert torch.allclose(merged["w"], torch.full((2, 2), 0.5 * 1 + 0.25 * 4 + 0.25 * 10))
    merged = merge_experts([a, b], [3.0, 1.0])  # unnormalised weights are normalised
    assert torch.allclose(merged["w"], torch.full((2, 2), 1.75))
    merged = merge_experts([a, b], [0.0, 0.0])  # never-used experts: uniform
    assert torch.allclose(merged["w"], torch.full((2, 2), 2.5))


def test_merge_layer_groups_and_weights():
    experts = [random_expert(GATED, seed) for seed in range(4)]
    grouping = LayerGrouping(expert_to_group=[0, 1, 0, 1], dominant_experts=[0, 1])
    frequency = torch.tensor([0.4, 0.3, 0.2, 0.1])
    merged = merge_layer(experts, grouping, frequency, GATED, permute=False)
    assert len(merged) == 2
    expected = (0.4 * experts[0]["up"] + 0.2 * experts[2]["up"]) / 0.6
    assert torch.allclose(merged[0]["up"], expected, atol=1e-6)
    uniform = merge_layer(experts, grouping, frequency, GATED, permute=False, weighting="uniform")
    assert torch.allclose(uniform[1]["down"], (experts[1]["down"] + experts[3]["down"]) / 2, atol=1e-6)
    # with alignment the dominant expert is untouched and the member is permuted first
    aligned = merge_layer(experts, grouping, frequency, GATED, permute=True)
    member = align_to(experts[0], experts[2], GATED)
    assert torch.allclose(aligned[0]["gate"], (0.4 * experts[0]["gate"] + 0.2 * member["gate"]) / 0.6, atol=1e-6)


def test_full_rank_without_pruning_is_exact():
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    factors = low_rank_sparse(weight, rank=16, sparse_rows=0)
    assert float((factors.dense() - weight).abs().max() / weight.abs().max()) < 1e-5


def test_sparse_rows_hold_the_largest_residual_rows():
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    factors = low_rank_sparse(weight, rank=4, sparse_rows=5)
    residual = weight - factors.left @ factors.right
    expected_rows = torch.topk(residual.norm(dim=1), 5).indices.sort().values
    assert torch.equal(factors.sparse_rows, expected_rows)
    approx = factors.dense()
    assert torch.allclose(approx[expected_rows], weight[expected_rows], atol=1e-5)
    # kept rows exact, other rows are the rank-4 approximation
    others = [r for r in range(24) if r not in expected_rows.tolist()]
    assert torch.allclose(approx[others], (factors.left @ factors.right)[others])


def test_rank_choices():
    assert rank_for_ratio(256, 128, 1.0) is None
    assert rank_for_ratio(256, 128, 0.25) == int(0.25 * 256 * 128 / (256 + 128))
    assert rank_for_ratio(4, 4, 0.9) == 1  # rounded down, at least 1
    with pytest.raises(UserError, match="rank_ratio"):
        rank_for_ratio(8, 8, 0.0)
    with pytest.raises(UserError, match="rank_ratio"):
        rank_for_ratio(8, 8, 1.5)
    assert sparse_row_count(100, 0.05) == 5 and sparse_row_count(100, 0.0) == 0
    low_rank = torch.randn(32, 4) @ torch.randn(4, 32)
    assert rank_for_energy([low_rank], 0.999999) == 4


def test_activation_aware_factors_fit_the_inputs_seen():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=generator)
    basis = torch.linalg.qr(torch.randn(16, 4, generator=generator)).Q  # inputs live in 4 of 16 dimensions
    x = torch.randn(512, 4, generator=generator) @ basis.T + 1e-4 * torch.randn(512, 16, generator=generator)
    moment = x.double().T @ x.double() / len(x)
    plain = low_rank_sparse(weight, rank=4, sparse_rows=0)
    aware = low_rank_sparse(weight, rank=4, sparse_rows=0, input_second_moment=moment)
    reference = x @ weight.T
    plain_error = float((x @ plain.dense().T - reference).norm() / reference.norm())
    aware_error = float((x @ aware.dense().T - reference).norm() / reference.norm())
    assert plain_error > 0.1 and aware_error < 1e-3, (plain_error, aware_error)


def test_a_registered_weighting_is_used_by_name_and_unknown_names_list_the_choices():
    from mcsmoe_deploy.compress import WEIGHTINGS, register_weighting

    @register_weighting("dominant-only")
    def dominant_only(frequency: torch.Tensor, members: list[int]) -> list[float]:
        return [1.0] + [0.0] * (len(members) - 1)

    try:
        experts = [random_expert(GATED, seed) for seed in range(4)]
        grouping = LayerGrouping(expert_to_group=[0, 1, 0, 1], dominant_experts=[0, 1])
        merged = merge_layer(experts, grouping, torch.tensor([0.4, 0.3, 0.2, 0.1]), GATED, permute=False,
                             weighting="dominant-only")
        assert torch.equal(merged[1]["down"], experts[1]["down"])  # the member weighs 0
        with pytest.raises(ValueError, match="registered twice"):
            register_weighting("dominant-only")(dominant_only)
    finally:
        del WEIGHTINGS["dominant-only"]
    with pytest.raises(UserError, match="weighting must be one of frequency, uniform, not 'dominant-only'"):
        merge_layer(experts, grouping, torch.tensor([0.4, 0.3, 0.2, 0.1]), GATED, weighting="dominant-only")


def test_parameters_are_checked_in_their_own_terms():
    from mcsmoe_deploy import CompressionRecipe
    from mcsmoe_deploy.errors import ParameterError

    cases = {
        "rank_ratio": (dict(rank_ratio=0.0), "rank_ratio must be in (0, 1], not 0.0"),
        "experts": (dict(experts=0), "experts must be at least 1, not 0"),
        "sparse_keep": (dict(sparse_keep=1.5), "sparse_keep must be in [0, 1], not 1.5"),
        "rank_energy": (dict(rank_energy=2.0), "rank_energy must be in (0, 1], not 2.0"),
        "grouping": (dict(grouping="hcsmoe"), "grouping must be one of similarity, random, drop, hc, reap, not 'hcsmoe'"),
        "low_rank": (dict(low_rank="qr"), "low_rank must be one of svd, activation-aware, not 'qr'"),
        "distill_lr": (dict(distill_lr=0.0), "distill_lr must be a positive finite number, not 0.0"),
    }
    for parameter, (fields, message) in cases.items():
        with pytest.raises(ParameterError) as caught:
            CompressionRecipe(**fields).validate()
        assert (caught.value.parameter, str(caught.value)) == (parameter, message)
    with pytest.raises(ParameterError, match="experts must be between 1 and the model's 8 experts per layer, not 9"):
        CompressionRecipe(experts=9).check_model(8)
    assert caught.value.renamed("--distill-lr") == "--distill-lr must be a positive finite number, not 0.0"
    assert CompressionRecipe(low_rank="activation-aware", activation_samples=64).calibration_inputs == 64
    assert CompressionRecipe(activation_samples=64).calibration_inputs == 0
