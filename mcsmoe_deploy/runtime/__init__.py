"""Serving exported models: sessions per backend, generation, and timing.

session: one DecoderSession interface (prefill / decode steps with a KV cache) over
    onnxruntime (ort_session), TensorRT (trt_session, trt_engine) and eager PyTorch
    (torch_session), registered in a table of backend name -> class, imported on demand;
    Seq2SeqSession, the encoder-decoder one (encode once, then decoder steps; ort and torch).
generation: the one decode loop: greedy and sampled generation with stop tokens and padded
    batches, teacher forcing, per-step times.
parity: two sessions on the same steps, compared (export validation).
timing: latency samples to percentiles.
bench, bench_report, active_bytes: `mcsmoe bench` (each contestant in its own process; JSON report).
compare: `mcsmoe compare`, absolute and in-run-ratio regressions between two reports.
"""

from .bench import BackendResult, BenchConfig, Contestant
from .bench_report import BenchReport, run_bench
from .compare import Comparison, compare_reports
from .generation import GenerationConfig, GenerationResult, generate, left_pad, pick_tokens, right_pad
from .parity import Discrepancy, compare_arrays, compare_decoders
from .session import (
    BACKENDS,
    DecoderSession,
    EncoderOutput,
    KVGeometry,
    Seq2SeqSession,
    StepOutput,
    backend_class,
    open_session,
)
from .timing import LatencyStats, percentile, summarize

__all__ = [
    "BACKENDS",
    "BackendResult",
    "BenchConfig",
    "BenchReport",
    "Comparison",
    "Contestant",
    "DecoderSession",
    "Discrepancy",
    "EncoderOutput",
    "GenerationConfig",
    "GenerationResult",
    "KVGeometry",
    "LatencyStats",
    "Seq2SeqSession",
    "StepOutput",
    "backend_class",
    "compare_arrays",
    "compare_decoders",
    "compare_reports",
    "generate",
    "left_pad",
    "open_session",
    "percentile",
    "pick_tokens",
    "right_pad",
    "run_bench",
    "summarize",
]
