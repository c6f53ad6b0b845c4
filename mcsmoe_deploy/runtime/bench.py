"""`mcsmoe bench`: latency, throughput and memory of models on backends, all measured in one run.

Each contestant (a model on a backend) runs in its own child process, one after the other,
so its peak RSS is its own; the parent measures memory bandwidth once and writes one
report. An iteration is a prefill of `prompt_len` random tokens (seeded; the same for all)
from an empty cache, then `decode_tokens` greedy decode steps; `warmup` iterations are
not recorded. Latencies are wall-clock times of `DecoderSession.step` alone, as `generate`
(the one decode loop) records them. An encoder-decoder export (Switch) encodes the prompt
once, counted in its prefill, then decodes from its start token.

The decode floor is the time one decode step would take if it only had to read the
weights it uses once from memory: active weight bytes per token / measured bandwidth.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..memory import peak_rss_bytes
from .active_bytes import active_weight_bytes, bytes_on_disk
from .generation import GenerationConfig, GenerationResult, generate
from .session import Seq2SeqSession, open_session
from .timing import LatencyStats, summarize


@dataclass(frozen=True)
class BenchConfig:
    """What every contestant runs: batch x prompt_len prefill, then decode_tokens steps; threads for all."""

    batch: int = 1
    prompt_len: int = 128
    decode_tokens: int = 32
    warmup: int = 1
    iterations: int = 5
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_len", "decode_tokens", "iterations"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1")
        if self.warmup < 0:
            raise UserError("warmup must be >= 0")


@dataclass(frozen=True)
class Contestant:
    """A model (ONNX file or checkpoint directory) on a backend, with a label for tables."""

    model: str
    backend: str
    label: str = ""
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.label or f"{Path(self.model).name}@{self.backend}"


@dataclass
class BackendResult:
    """One contestant's numbers. Latencies in ms (prefill: the whole prompt; decode: per step)."""

    name: str
    model: str
    backend: str
    session: dict
    load_seconds: float
    prefill: LatencyStats
    decode: LatencyStats
    decode_tokens_per_second: float  # batch / p50 decode step
    prefill_tokens_per_second: float  # batch x prompt_len / p50 prefill
    peak_rss_bytes: int
    gpu_peak_bytes: int | None
    bytes_on_disk: int
    active_weight_bytes: int  # weight bytes one decode step reads (per token at batch 1)
    decode_floor_ms: float
    decode_vs_floor: float  # p50 decode step / floor

    @classmethod
    def from_dict(cls, data: dict) -> BackendResult:
        data = dict(data)
        data["prefill"], data["decode"] = LatencyStats(**data["prefill"]), LatencyStats(**data["decode"])
        return cls(**data)


def _gpu_peak() -> int | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


def measure(contestant: Contestant, config: BenchConfig, bandwidth: float) -> BackendResult:
    """Load and time one contestant in this process (see the module docstring)."""
    start = time.perf_counter()
    session = open_session(contestant.model, contestant.backend, threads=config.threads, **contestant.options)
    load_seconds = time.perf_counter() - start
    rng = np.random.default_rng(config.seed)
    prompt = rng.integers(0, session.vocab_size, (config.batch, config.prompt_len), dtype=np.int64)
    greedy = GenerationConfig(max_new_tokens=config.decode_tokens + 1)  # the last pick needs no step
    prefill_times, decode_times = [], []
    for iteration in range(config.warmup + config.iterations):
        timed = _timed_generate(session, prompt, greedy)
        if iteration >= config.warmup:
            prefill_times.append(timed.prefill_seconds)
            decode_times += timed.decode_seconds
    prefill, decode = summarize(prefill_times), summarize(decode_times)
    active = active_weight_bytes(contestant.model, contestant.backend)
    floor_ms = 1e3 * active / bandwidth
    result = BackendResult(
        name=contestant.name,
        model=str(contestant.model),
        backend=contestant.backend,
        session=session.describe(),
        load_seconds=load_seconds,
        prefill=prefill,
        decode=decode,
        decode_tokens_per_second=1e3 * config.batch / decode.p50_ms,
        prefill_tokens_per_second=1e3 * config.batch * config.prompt_len / prefill.p50_ms,
        peak_rss_bytes=peak_rss_bytes(),
        gpu_peak_bytes=_gpu_peak(),
        bytes_on_disk=bytes_on_disk(contestant.model),
        active_weight_bytes=active,
        decode_floor_ms=floor_ms,
        decode_vs_floor=decode.p50_ms / floor_ms,
    )
    session.close()
    return result


def _timed_generate(session, prompt: np.ndarray, config: GenerationConfig) -> GenerationResult:
    """`generate` over [B, P] prompt tokens; an encoder-decoder encodes them once and decodes from its start
    token, the encoding counted in the prefill time."""
    if not isinstance(session, Seq2SeqSession):
        return generate(session, prompt, config)
    start = time.perf_counter()
    encoded = session.encode(prompt, np.ones_like(prompt))
    encode_seconds = time.perf_counter() - start
    timed = generate(session.decoder(encoded), [[session.decoder_start_token_id]] * len(prompt), config)
    timed.prefill_seconds += encode_seconds
    return timed


def _child(contestant: Contestant, config: BenchConfig, bandwidth: float, queue) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the parent shows one bar over contestants
    transformers.logging.set_verbosity_error()
    try:
        queue.put(("ok", asdict(measure(contestant, config, bandwidth))))
    except UserError as exc:
        queue.put(("user", str(exc)))
    except Exception as exc:  # reported by the parent with the contestant's name
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def measure_in_child(contestant: Contestant, config: BenchConfig, bandwidth: float) -> BackendResult:
    """`measure` in a fresh process (spawned: no memory inherited), so peak RSS is the contestant's own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(contestant, config, bandwidth, queue))
    process.start()
    try:
        status, payload = queue.get()
    finally:
        process.join()
    if status == "user":
        raise UserError(f"{contestant.name}: {payload}")
    if status == "error":
        raise RuntimeError(f"{contestant.name}: {payload}")
    return BackendResult.from_dict(payload)


def memory_bandwidth(threads: int | None = None, size_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Read bandwidth (bytes/s): the best of `repeats` sums over a `size_bytes` float32 buffer in torch."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        buffer = torch.ones(size_bytes // 4, dtype=torch.float32)
        buffer.sum()  # touch every page first
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - start)
        return size_bytes / best
    finally:
        torch.set_num_threads(previous)


__all__ = ["BackendResult", "BenchConfig", "Contestant", "measure", "measure_in_child", "memory_bandwidth"]
