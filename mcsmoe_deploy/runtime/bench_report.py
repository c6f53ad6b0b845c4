"""The report of one `mcsmoe bench` run: what ran where, the numbers, and in-run ratios; JSON in and out.

JSON schema "mcsmoe-bench/1" (all times in ms unless the name says seconds, sizes in bytes):

    {"schema": "mcsmoe-bench/1", "created": ISO 8601 UTC, "git_commit": str | null,
     "versions": {"mcsmoe", "python", "numpy", "onnx", "onnxruntime", "torch", "transformers"},
     "machine": {"platform", "processor", "cpu_count", "memory_bytes", "gpu": str | null},
     "config": BenchConfig fields, "memory_bandwidth_bytes_per_s": float,
     "results": [BackendResult fields; "prefill" / "decode": LatencyStats fields (count, mean_ms,
                 p50_ms, p90_ms, p99_ms, min_ms, max_ms)],
     "baseline": name of the result ratios are taken against (the first),
     "ratios": {result name: {metric: value / baseline's value}}}

Ratio metrics: decode_p50, prefill_p50, peak_rss (lower is better) and
decode_tokens_per_second (higher is better).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from ..files import write_file_atomically
from .bench import BackendResult, BenchConfig, Contestant, measure_in_child, memory_bandwidth

SCHEMA = "mcsmoe-bench/1"
RATIO_METRICS = {  # metric -> (how to read it from a result, True when lower is better)
    "decode_p50": (lambda r: r.decode.p50_ms, True),
    "prefill_p50": (lambda r: r.prefill.p50_ms, True),
    "peak_rss": (lambda r: r.peak_rss_bytes, True),
    "decode_tokens_per_second": (lambda r: r.decode_tokens_per_second, False),
}


@dataclass
class BenchReport:
    config: BenchConfig
    results: list[BackendResult]
    memory_bandwidth_bytes_per_s: float
    created: str = ""
    git_commit: str | None = None
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    schema: str = SCHEMA

    @property
    def baseline(self) -> str:
        return self.results[0].name

    def ratios(self) -> dict[str, dict[str, float]]:
        """Every result's metrics divided by the baseline's (the first result), same run."""
        base = self.results[0]
        return {
            r.name: {metric: read(r) / read(base) for metric, (read, _) in RATIO_METRICS.items()}
            for r in self.results
        }

    def to_dict(self) -> dict:
        return {
            "schema": self.schema, "created": self.created, "git_commit": self.git_commit,
            "versions": self.versions, "machine": self.machine, "config": asdict(self.config),
            "memory_bandwidth_bytes_per_s": self.memory_bandwidth_bytes_per_s,
            "results": [asdict(r) for r in self.results], "baseline": self.baseline, "ratios": self.ratios(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> BenchReport:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not an {SCHEMA} report (schema {data.get('schema')!r})")
        return cls(
            config=BenchConfig(**data["config"]),
            results=[BackendResult.from_dict(r) for r in data["results"]],
            memory_bandwidth_bytes_per_s=data["memory_bandwidth_bytes_per_s"],
            created=data["created"], git_commit=data["git_commit"], versions=data["versions"],
            machine=data["machine"], schema=data["schema"],
        )

    def save(self, path: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
        """Write the JSON atomically (`files.write_file_atomically`), never over one of `inputs` (the models)."""
        return write_file_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n", inputs=inputs)

    @classmethod
    def load(cls, path: str | Path) -> BenchReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("mcsmoe-deploy", "numpy", "onnx", "onnxruntime", "torch", "transformers"):
        try:
            found[package.replace("-deploy", "")] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _machine() -> dict:
    import psutil

    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total, "gpu": gpu}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _distinct_names(contestants: list[Contestant]) -> list[Contestant]:
    """Label contestants whose default names collide (same file name in two folders) by their folder too."""
    names = [c.name for c in contestants]
    return [
        c if names.count(c.name) == 1 or c.label
        else replace(c, label=f"{Path(c.model).parent.name}/{Path(c.model).name}@{c.backend}")
        for c in contestants
    ]


def run_bench(contestants: list[Contestant], config: BenchConfig, progress: bool = False) -> BenchReport:
    """Measure every contestant (each in its own process, one after the other) in one run."""
    contestants = _distinct_names(contestants)
    bandwidth = memory_bandwidth(config.threads)
    results = [
        measure_in_child(c, config, bandwidth)
        for c in tqdm(contestants, desc="bench", unit="model", disable=not progress)
    ]
    return BenchReport(
        config=config, results=results, memory_bandwidth_bytes_per_s=bandwidth,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), git_commit=_git_commit(),
        versions=_versions(), machine=_machine(),
    )


__all__ = ["BenchReport", "RATIO_METRICS", "SCHEMA", "run_bench"]
