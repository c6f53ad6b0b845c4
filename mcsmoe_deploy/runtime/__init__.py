"""Serving exported models: sessions per backend, generation, and timing.

session: one DecoderSession interface (prefill / decode steps with a KV cache) over
    onnxruntime (ort_session), TensorRT (trt_session) and eager PyTorch (torch_session).
generation: greedy and sampled generation with stop tokens and padded batches.
timing: latency samples to percentiles.
"""

from .generation import GenerationConfig, GenerationResult, generate, left_pad, pick_tokens
from .session import BACKENDS, DecoderSession, KVGeometry, StepOutput, open_session
from .timing import LatencyStats, percentile, summarize

__all__ = [
    "BACKENDS",
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
