"""Drive exported causal-LM graphs in onnxruntime: greedy decoding and timed prefill / decode steps.

Two kinds of export are driven the same way, as DecoderSessions stepped by the runtime's one
decode loop (`mcsmoe_deploy.runtime.generate`):

- ours (`mcsmoe_deploy.exporters`): ONE graph for prefill and decode, the runtime's own
  OrtDecoderSession over a session opened with the benchmark's options.
- transformers (`transformers.exporters.OnnxExporter.export_for_generation`): `prefill.onnx`
  (no cache inputs; outputs `logits` and the cache, `cache.layers.{i}.keys|values` in
  transformers 5.24, `past_key_values.layers...` before) and `decode.onnx` (cache inputs
  `input.` + those names, outputs `output.` + those names), as `TransformersExportSession`. Inputs the graph does not
  read are pruned by that exporter (an all-ones `attention_mask` at batch 1, say), so feeds
  are built from the session's own input list.

Times are wall-clock seconds of each `DecoderSession.step` as `generate` records them: the next
token is picked outside the timed region. The cache stays in onnxruntime's memory (OrtValues
passed from one step's outputs to the next step's inputs), as a serving loop would keep it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mcsmoe_deploy.contract import KVGeometry
from mcsmoe_deploy.runtime.generation import GenerationConfig, generate
from mcsmoe_deploy.runtime.ort_session import OrtDecoderSession
from mcsmoe_deploy.runtime.session import DecoderSession, StepOutput

ExportedLM = DecoderSession  # a contestant: any session `generate` can step


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
    # load_session: a MatMulNBits accuracy level asked in `options` also reaches the nodes target ort writes
    from mcsmoe_deploy.runtime.ort_session import load_session

    return load_session(Path(path), "cpu", options)


@dataclass
class Cache:
    """The KV cache between steps: decode-graph input name -> OrtValue, and the tokens it holds."""

    values: dict[str, ort.OrtValue] = field(default_factory=dict)
    length: int = 0


class TransformersExportSession(DecoderSession):
    """transformers' prefill.onnx + decode.onnx as one DecoderSession: an empty cache runs the prefill graph."""

    backend = "ort"

    def __init__(self, name: str, directory: Path, options: ort.SessionOptions):
        self.name = name
        self.prefill_session = _open(directory / "prefill.onnx", options)
        self.decode_session = _open(directory / "decode.onnx", options)
        # cache inputs are the decode graph's `input.X`, fed from the outputs `X` (prefill) or `output.X` (decode)
        self.cache_inputs = {spec.name.removeprefix("input."): spec.name for spec in self.decode_session.get_inputs()
                             if spec.name.startswith("input.")}

    def _cache_input(self, output: str) -> str | None:
        """The decode-graph input an output feeds, None for outputs that are not cache."""
        return self.cache_inputs.get(output.removeprefix("output."))

    def empty_past(self, batch: int) -> Cache:
        return Cache()

    def step(self, input_ids, attention_mask, position_ids, past: Cache) -> StepOutput:
        session = self.prefill_session if past.length == 0 else self.decode_session
        total = past.length + input_ids.shape[1]
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "cache_position": np.arange(past.length, total, dtype=np.int64)}
        feeds = {}
        for spec in session.get_inputs():
            if spec.name in past.values:
                feeds[spec.name] = past.values[spec.name]
            elif spec.name in arrays:
                feeds[spec.name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arrays[spec.name]))
            else:
                raise KeyError(f"{self.name}: no feed for graph input {spec.name!r}")
        names = [spec.name for spec in session.get_outputs()]
        outputs = session.run_with_ort_values(names, feeds)
        logits, cache = None, Cache(length=total)
        for name, value in zip(names, outputs):
            if name == "logits":
                logits = value.numpy()
            elif (target := self._cache_input(name)) is not None:
                cache.values[target] = value
        if logits is None:
            raise KeyError(f"{self.name}: the graph has no 'logits' output")
        return StepOutput(logits, cache)


def open_ours(
    name: str, path: Path, num_layers: int, kv_heads: int, head_dim: int, options: ort.SessionOptions
) -> ExportedLM:
    """A graph from `export_model(with_past=True)`: one session for both stages."""
    return OrtDecoderSession.from_inference_session(_open(path, options), KVGeometry(num_layers, kv_heads, head_dim))


def open_transformers(name: str, directory: Path, options: ort.SessionOptions) -> ExportedLM:
    """A `save_pretrained` directory of `export_for_generation`: prefill.onnx and decode.onnx."""
    return TransformersExportSession(name, directory, options)


def greedy(lm: ExportedLM, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """Greedy decoding of `new_tokens` tokens after `prompt` [1, S]."""
    return generate(lm, prompt, GenerationConfig(max_new_tokens=new_tokens)).tokens[0]


def decode_seconds(lm: ExportedLM, prompt: np.ndarray, steps: int) -> list[float]:
    """Seconds of each of `steps` greedy decode steps after an untimed prefill of `prompt` [1, S]."""
    return generate(lm, prompt, GenerationConfig(max_new_tokens=steps + 1)).decode_seconds


def prefill_seconds(lm: ExportedLM, prompt: np.ndarray) -> float:
    """Seconds of one prefill of `prompt` [1, S] on an empty cache."""
    return generate(lm, prompt, GenerationConfig(max_new_tokens=1)).prefill_seconds


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The contestants in the order round `round_index` runs them: rotated by one each round. onnxruntime's
    idle pool threads spin for a while after a run, so a session runs slower right after another one on
    2 cores; in a fixed order one contestant always pays for the same neighbour (measured on the embedded
    model: the same graph 0.96x or 1.07x the builder's by position alone)."""
    names = list(names)
    shift = round_index % len(names) if names else 0
    return names[shift:] + names[:shift]


def timed_rounds(lms: dict[str, ExportedLM], rounds: int, prompt: np.ndarray, steps: int,
                 long_prompt: np.ndarray | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of each decode step and of each long prefill per contestant, over `rounds` alternating rounds.

    Each contestant first gets an untimed warm-up (4 decode steps). In round r the contestants, in
    `round_order(r)`, each decode `steps` greedy tokens after an untimed prefill of `prompt`; then, in the
    same order, each prefills `long_prompt` once (when given). Decodes and prefills are not interleaved per
    contestant, so no decode step runs right after another session's long prefill.
    """
    decode = {name: [] for name in lms}
    prefill = {name: [] for name in lms}
    for lm in lms.values():
        decode_seconds(lm, prompt, 4)
    for index in range(rounds):
        order = round_order(lms, index)
        for name in order:
            decode[name] += decode_seconds(lms[name], prompt, steps)
        for name in order if long_prompt is not None else ():
            prefill[name].append(prefill_seconds(lms[name], long_prompt))
    return decode, prefill


def round_ratios(samples: dict[str, Sequence[float]], reference: str, rounds: int) -> dict[str, np.ndarray]:
    """Per round, each contestant's median over that round's samples divided by `reference`'s: [rounds] each.

    `samples` as `timed_rounds` returns them (each contestant's samples round after round, as many per round).
    Paired by round, the ratios cancel what drifts between rounds (a shared machine's neighbours), so their
    spread says how far one run's ratio of medians can be trusted.
    """
    per_round = {name: np.median(np.asarray(values, dtype=float).reshape(rounds, -1), axis=1)
                 for name, values in samples.items()}
    return {name: medians / per_round[reference] for name, medians in per_round.items()}


def describe_round_ratios(ratios: np.ndarray) -> str:
    """One contestant's `round_ratios` as the benchmarks print them: "rounds MEDIANx, MIN-MAXx"."""
    return f"rounds {np.median(ratios):.2f}x, {ratios.min():.2f}-{ratios.max():.2f}x"


def random_prompt(length: int, vocab: int, seed: int) -> np.ndarray:
    """A reproducible prompt [1, length] of token ids in [3, vocab) (clear of the usual special ids)."""
    return np.random.default_rng(seed).integers(3, vocab, size=(1, length), dtype=np.int64)
