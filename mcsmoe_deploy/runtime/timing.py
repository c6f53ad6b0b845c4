"""Latency samples to percentiles, the way every benchmark here reports them.

Samples are wall-clock seconds (`time.perf_counter` differences). Percentiles use linear
interpolation between closest ranks (numpy's default, "method 7" of Hyndman & Fan), so
p50 of an even count is the mean of the two middle samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0 <= q <= 100) of `samples`, linearly interpolated between ranks.

    Raises ValueError on an empty sample or q outside [0, 100].
    """
    if not samples:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], not {q}")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one latency sample, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(seconds: Sequence[float]) -> LatencyStats:
    """Percentiles (ms) of latency samples given in seconds."""
    if not seconds:
        raise ValueError("no latency samples")
    ms = [1e3 * s for s in seconds]
    return LatencyStats(
        count=len(ms),
        mean_ms=sum(ms) / len(ms),
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        min_ms=min(ms),
        max_ms=max(ms),
    )


__all__ = ["LatencyStats", "percentile", "summarize"]
