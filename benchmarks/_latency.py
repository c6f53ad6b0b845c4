"""Drive exported causal-LM graphs in onnxruntime: greedy decoding and timed prefill / decode steps.

Two kinds of export are driven the same way:

- ours (`mcsmoe_deploy.exporters`): ONE graph for prefill and decode. Inputs `input_ids`,
  `attention_mask` [B, P+S], `position_ids` and `past_key_values.{i}.key|value`
  [B, kv_heads, P, head_dim] (P = 0 for a prefill); outputs `logits` and `present.{i}.key|value`.
- transformers (`transformers.exporters.OnnxExporter.export_for_generation`): `prefill.onnx`
  (no cache inputs; outputs `logits`, `past_key_values.layers.{i}.keys|values`) and
  `decode.onnx` (cache inputs `input.past_key_values.layers.{i}.keys|values`, outputs
  `output.past_key_values...`). Inputs the graph does not read are pruned by that exporter
  (an all-ones `attention_mask` at batch 1, say), so feeds are built from the session's own
  input list.

Times are wall-clock seconds around `run_with_ort_values` only: feeds are built and the next
token is picked outside the timed region. The cache stays in onnxruntime's memory (OrtValues
passed from one step's outputs to the next step's inputs), as a serving loop would keep it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session_options(threads: int, spin: bool = True) -> ort.SessionOptions:
    """The options every contestant runs with: `threads` intra-op threads, one inter-op, all graph optimisations.

    spin: idle pool threads spin before sleeping (onnxruntime's default); False makes them sleep at once.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def _open(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Cache:
    """The KV cache between steps: decode-graph input name -> OrtValue, and the tokens it holds."""

    values: dict[str, ort.OrtValue] = field(default_factory=dict)
    length: int = 0


@dataclass
class ExportedLM:
    """One contestant's graph(s) and how a step's outputs become the next step's cache.

    cache_input: output name -> the decode-graph input it feeds, None for other outputs.
    prefill_past: what the prefill graph takes as past (ours: zero-length arrays; transformers: none).
    """

    name: str
    prefill_session: ort.InferenceSession
    decode_session: ort.InferenceSession
    cache_input: Callable[[str], str | None]
    prefill_past: dict[str, np.ndarray] = field(default_factory=dict)

    def _run(self, session: ort.InferenceSession, ids: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache, float]:
        """One forward of `ids` [1, S] after `cache`: (last position's logits [V], new cache, seconds)."""
        seq = ids.shape[1]
        total = cache.length + seq
        arrays = {
            "input_ids": ids,
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(cache.length, total, dtype=np.int64)[None],
            "cache_position": np.arange(cache.length, total, dtype=np.int64),
        }
        if cache.length == 0:
            arrays.update(self.prefill_past)
        feeds = {}
        for spec in session.get_inputs():
            if spec.name in cache.values:
                feeds[spec.name] = cache.values[spec.name]
            elif spec.name in arrays:
                # OrtValue wraps the array without a copy; `arrays` keeps it alive through the run
                feeds[spec.name] = ort.OrtValue.ortvalue_from_numpy(arrays[spec.name])
            else:
                raise KeyError(f"{self.name}: no feed for graph input {spec.name!r}")
        names = [spec.name for spec in session.get_outputs()]
        start = time.perf_counter()
        outputs = session.run_with_ort_values(names, feeds)
        seconds = time.perf_counter() - start
        logits = None
        new_cache = Cache(length=total)
        for name, value in zip(names, outputs):
            if name == "logits":
                logits = value.numpy()[0, -1]
            elif (target := self.cache_input(name)) is not None:
                new_cache.values[target] = value
        if logits is None:
            raise KeyError(f"{self.name}: the graph has no 'logits' output")
        return logits, new_cache, seconds

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Cache, float]:
        """Run the prompt `ids` [1, S] on an empty cache: (last logits, cache, seconds)."""
        return self._run(self.prefill_session, ids, Cache())

    def decode(self, token: int, cache: Cache) -> tuple[np.ndarray, Cache, float]:
        """Feed one token after `cache`: (its logits, grown cache, seconds)."""
        return self._run(self.decode_session, np.array([[token]], dtype=np.int64), cache)


def open_ours(
    name: str, path: Path, num_layers: int, kv_heads: int, head_dim: int, options: ort.SessionOptions
) -> ExportedLM:
    """A graph from `export_model(with_past=True)`: one session for both stages."""
    session = _open(path, options)
    empty = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
    past = {f"past_key_values.{i}.{kind}": empty for i in range(num_layers) for kind in ("key", "value")}

    def cache_input(output: str) -> str | None:
        return "past_key_values." + output.removeprefix("present.") if output.startswith("present.") else None

    return ExportedLM(name, session, session, cache_input, past)


def open_transformers(name: str, directory: Path, options: ort.SessionOptions) -> ExportedLM:
    """A `save_pretrained` directory of `export_for_generation`: prefill.onnx and decode.onnx."""
    prefill = _open(directory / "prefill.onnx", options)
    decode = _open(directory / "decode.onnx", options)
    cache_inputs = {spec.name.removeprefix("input."): spec.name for spec in decode.get_inputs()}

    def cache_input(output: str) -> str | None:
        return cache_inputs.get(output.removeprefix("output.")) if "past_key_values" in output else None

    return ExportedLM(name, prefill, decode, cache_input)


def greedy(lm: ExportedLM, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """Greedy decoding of `new_tokens` tokens after `prompt` [1, S]."""
    logits, cache, _ = lm.prefill(prompt)
    tokens = [int(logits.argmax())]
    while len(tokens) < new_tokens:
        logits, cache, _ = lm.decode(tokens[-1], cache)
        tokens.append(int(logits.argmax()))
    return tokens


def decode_seconds(lm: ExportedLM, prompt: np.ndarray, steps: int) -> list[float]:
    """Seconds of each of `steps` greedy decode steps after an untimed prefill of `prompt` [1, S]."""
    logits, cache, _ = lm.prefill(prompt)
    samples = []
    for _ in range(steps):
        logits, cache, seconds = lm.decode(int(logits.argmax()), cache)
        samples.append(seconds)
    return samples


def prefill_seconds(lm: ExportedLM, prompt: np.ndarray) -> float:
    """Seconds of one prefill of `prompt` [1, S] on an empty cache."""
    return lm.prefill(prompt)[2]


def random_prompt(length: int, vocab: int, seed: int) -> np.ndarray:
    """A reproducible prompt [1, length] of token ids in [3, vocab) (clear of the usual special ids)."""
    return np.random.default_rng(seed).integers(3, vocab, size=(1, length), dtype=np.int64)
