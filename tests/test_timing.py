"""Percentiles of latency samples: linear interpolation between ranks, as numpy's default."""

from __future__ import annotations

import numpy as np
import pytest

from mcsmoe_deploy.runtime.timing import percentile, summarize


def test_percentiles_of_one_to_hundred():
    samples = list(range(100, 0, -1))  # unordered on purpose
    assert percentile(samples, 0) == 1
    assert percentile(samples, 50) == pytest.approx(50.5)
    assert percentile(samples, 90) == pytest.approx(90.1)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert percentile(samples, 100) == 100


def test_matches_numpy_on_random_samples():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(size=37).tolist()
    for q in (5, 50, 90, 99):
        assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)), rel=1e-12)


def test_summarize_reports_milliseconds():
    stats = summarize([0.004, 0.001, 0.003, 0.002])
    assert stats.count == 4
    assert stats.p50_ms == pytest.approx(2.5)
    assert stats.mean_ms == pytest.approx(2.5)
    assert stats.p90_ms == pytest.approx(3.7)
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 4.0))


def test_single_sample_and_errors():
    assert percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        summarize([])


def test_round_ratios_pair_each_round_with_the_reference():
    """benchmarks/_latency.round_ratios: the ratio of medians within each round, so a round where the
    machine ran everything 3x slower gives the same ratio as the others."""
    from benchmarks._latency import round_ratios

    reference = [1.0, 1.0, 3.0, 3.0, 2.0, 2.0]  # 3 rounds x 2 samples, the second round slowed 3x
    ours = [0.5, 0.7, 1.8, 1.8, 1.2, 1.4]
    ratios = round_ratios({"ours": ours, "builder": reference}, "builder", rounds=3)
    np.testing.assert_allclose(ratios["ours"], [0.6, 0.6, 0.65])
    np.testing.assert_allclose(ratios["builder"], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError):  # samples that do not split into whole rounds
        round_ratios({"ours": ours[:5], "builder": reference[:5]}, "builder", rounds=3)
