"""`mcsmoe compare BASE.json NEW.json`: which metrics got worse than a threshold between two bench runs.

Two kinds of check, per result matched by name:
- absolute: the metric itself, new vs base (sensitive to the machine: fine on a quiet,
  fixed machine, noisy on shared CI runners);
- ratios: the metric relative to the same run's baseline result (the first, e.g. the dense
  model), new vs base. In-run ratios cancel machine speed, so CI gates on them alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .bench_report import RATIO_METRICS, BenchReport


@dataclass(frozen=True)
class MetricChange:
    """One metric of one result: base and new values, and how much worse new is (0.25 = 25% worse)."""

    result: str
    kind: str  # "absolute" | "ratio"
    metric: str
    base: float
    new: float
    worse_by: float
    regressed: bool


@dataclass
class Comparison:
    changes: list[MetricChange]
    missing: list[str]  # results in base that new lacks
    max_regression: float

    @property
    def failed(self) -> bool:
        return bool(self.missing) or any(c.regressed for c in self.changes)


def parse_threshold(text: str) -> float:
    """"10%" or "0.1" -> 0.1."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UserError(f"--max-regression {text!r} is not a number or percentage (e.g. 10%)") from None
    if value < 0:
        raise UserError("--max-regression must be >= 0")
    return value


def _worse_by(base: float, new: float, lower_is_better: bool) -> float:
    if base <= 0 or new <= 0:
        return 0.0
    return new / base - 1 if lower_is_better else base / new - 1


def compare_reports(base: BenchReport, new: BenchReport, max_regression: float = 0.10,
                    ratios_only: bool = False) -> Comparison:
    """Every metric of every result of `base` found in `new`; regressed when worse by more than max_regression."""
    new_by_name = {r.name: r for r in new.results}
    base_ratios, new_ratios = base.ratios(), new.ratios()
    changes, missing = [], []
    for result in base.results:
        if result.name not in new_by_name:
            missing.append(result.name)
            continue
        for metric, (read, lower_is_better) in RATIO_METRICS.items():
            pairs = []
            if not ratios_only:
                pairs.append(("absolute", read(result), read(new_by_name[result.name])))
            if result.name != base.baseline and result.name in new_ratios:
                pairs.append(("ratio", base_ratios[result.name][metric], new_ratios[result.name][metric]))
            for kind, old, now in pairs:
                worse = _worse_by(old, now, lower_is_better)
                changes.append(MetricChange(result.name, kind, metric, old, now, worse, worse > max_regression))
    return Comparison(changes, missing, max_regression)


__all__ = ["Comparison", "MetricChange", "compare_reports", "parse_threshold"]
