"""Serving exported models: sessions per backend, generation, and timing.

session: one DecoderSession interface (prefill / decode steps with a KV cache) over
    onnxruntime (ort_session), TensorRT (trt_session) and eager PyTorch (torch_session).
generation: greedy and sampled generation with stop tokens and padded batches.
timing: latency samples to percentiles.
bench, bench_report, active_bytes: `mcsmoe bench` (each contestant in its own process; JSON report).
compare: `mcsmoe compare`, absolute and in-run-ratio regressions between two reports.
"""

from .bench import BackendResult, BenchConfig, Contestant
from .bench_report import BenchReport, run_bench
from .compare import Comparison, compare_reports

from .generation import GenerationConfig, GenerationResult, generate, left_pad, pick_tokens
from .session import BACKENDS, DecoderSession, KVGeometry, StepOutput, open_session
from .timing import LatencyStats, percentile, summarize

__all__ = [
    "BACKENDS",
    "BackendResult",
    "BenchConfig",
    "BenchReport",
    "Comparison",
    "Contestant",
    "compare_reports",
    "run_bench",
    "DecoderSession",
    "GenerationConfig",
    "GenerationResult",
    "KVGeometry",
    "LatencyStats",
    "StepOutput",
    "generate",
    "left_pad",
    "open_session",
    "percentile",
    "pick_tokens",
    "summarize",
]
