"""Validation of an exported graph: structure, and onnxruntime against the torch reference.

Parity as Polygraphy checks it: the runtime's onnxruntime session over the file and a torch
session over the reference model run the same steps, and one comparator
(runtime.parity.compare_arrays) measures how far apart their outputs are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from ..contract import ATTENTION_MASK, DOMAIN, INPUT_IDS, LOGITS, OP_TYPE, external_data_path
from ..runtime.ort_session import OrtDecoderSession, OrtSeq2SeqSession, quantized_kernels, written_accuracy_level
from ..runtime.parity import Discrepancy, compare_arrays, compare_decoders, compare_runs, decoder_logits
from ..runtime.torch_session import TorchDecoderSession, TorchSeq2SeqSession


@dataclass
class ParityCheck:
    """onnxruntime vs torch on one file.

    shapes: (batch, tokens) runs; for a KV-cache graph each is a prefill of `tokens`
    with an empty past followed by one decode step with the prefill's presents.
    max_rel_error: max |ort - torch| divided by max |torch| of the same run.
    """

    path: str
    with_past: bool
    shapes: list[tuple[int, int]]
    max_abs_error: float
    max_rel_error: float


@dataclass
class ExportReport:
    """What was written and how closely onnxruntime follows the torch reference."""

    path: str
    file_bytes: int  # graph plus external data, if any
    nodes: int
    custom_nodes: dict[str, int]  # "domain::op_type" -> count, custom domains only
    functions: int
    op_types: dict[str, int] = field(default_factory=dict)
    # onnxruntime's quantized kernels by accuracy level: "MatMulNBits" -> {4: 9}, "QMoE" -> {0: 4}
    accuracy_levels: dict[str, dict[int, int]] = field(default_factory=dict)
    target: str = "ort"
    fusion: str | None = None  # target "ort": what became onnxruntime's fused ops, and what was kept and why
    with_past: bool = True
    compressed: bool = True
    inlined_path: str | None = None
    parity: list[ParityCheck] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0  # of the exporting process, lifetime peak

    @property
    def moe_nodes(self) -> int:
        """GroupedLowRankMoE nodes in the top-level graph."""
        return self.custom_nodes.get(f"{DOMAIN}::{OP_TYPE}", 0)

    @property
    def max_rel_error(self) -> float | None:
        return max((p.max_rel_error for p in self.parity), default=None)

    @property
    def max_abs_error(self) -> float | None:
        return max((p.max_abs_error for p in self.parity), default=None)

    def to_dict(self) -> dict:
        return {**asdict(self), "moe_nodes": self.moe_nodes}


def _highest_level_first(levels: dict[str, Counter]) -> dict[str, dict[int, int]]:
    """ExportReport.accuracy_levels from per-op counters of kernels by accuracy level."""
    return {op: dict(sorted(by_level.items(), reverse=True)) for op, by_level in levels.items()}


def describe(model_proto: onnx.ModelProto, path: str | Path) -> ExportReport:
    """Node counts of a saved model (top-level graph) and its size on disk (with external data)."""
    path = Path(path)
    data = external_data_path(path)
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    counts = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model_proto.graph.node)
    custom = {op: count for op, count in counts.items() if "::" in op and not op.startswith("ai.onnx::")}
    levels: dict[str, Counter] = {}
    for node in quantized_kernels(model_proto.graph):
        levels.setdefault(node.op_type, Counter())[written_accuracy_level(node)] += 1
    return ExportReport(
        path=str(path),
        file_bytes=size,
        nodes=len(model_proto.graph.node),
        custom_nodes=custom,
        functions=len(model_proto.functions),
        op_types=dict(counts.most_common()),
        accuracy_levels=_highest_level_first(levels),
    )


def describe_files(model_protos: list[onnx.ModelProto], paths: list[Path], root: str | Path) -> ExportReport:
    """One report over several graphs written together (Switch's encoder and decoder): counts and bytes summed."""
    parts = [describe(proto, path) for proto, path in zip(model_protos, paths)]
    custom: Counter = Counter()
    ops: Counter = Counter()
    levels: dict[str, Counter] = {}
    for part in parts:
        custom.update(part.custom_nodes)
        ops.update(part.op_types)
        for op, by_level in part.accuracy_levels.items():
            levels.setdefault(op, Counter()).update(by_level)
    return ExportReport(
        path=str(root),
        file_bytes=sum(p.file_bytes for p in parts),
        nodes=sum(p.nodes for p in parts),
        custom_nodes=dict(custom),
        functions=sum(p.functions for p in parts),
        op_types=dict(ops.most_common()),
        accuracy_levels=_highest_level_first(levels),
    )


def _session(path: str | Path):
    from ..runtime.ort_session import load_session, session_options

    # accuracy level 0: quantized MatMuls (fused or written as MatMulNBits) compute in float32, so parity
    # is exact up to rounding
    options = session_options(opt_level="all", matmul_accuracy_level=0)
    return load_session(Path(path), "cpu", options)


@dataclass
class ReferenceRuns:
    """The torch reference's logits on the validation inputs, recorded first so that the reference can be
    freed before onnxruntime opens the graph: the two models are never in memory together.

    inputs: per shape, token ids [B, L] (no past) or [B, L + 1] (with past: a prefill of L, one decode step).
    logits: per shape, per step (one step without past; prefill [B, L, V] then decode [B, 1, V] with past).
    """

    with_past: bool
    shapes: list[tuple[int, int]]
    inputs: list[np.ndarray]
    logits: list[list[np.ndarray]]


@torch.no_grad()
def record_reference(
    reference: torch.nn.Module,
    with_past: bool,
    shapes: tuple[tuple[int, int], ...] = ((1, 5), (2, 9)),
    seed: int = 0,
    vocab_size: int | None = None,
) -> ReferenceRuns:
    """Run `reference` on random token ids (seeded; drawn below `vocab_size`, default the model's) and keep its
    logits: for a logits graph one forward per shape ([batch, sequence]), for a KV-cache graph a prefill of
    `sequence` tokens from an empty past, then one decode step."""
    vocab_size = vocab_size or reference.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    runs = ReferenceRuns(with_past, [tuple(s) for s in shapes], [], [])
    runner = TorchDecoderSession.from_model(reference) if with_past else None
    for batch, length in shapes:
        if with_past:
            ids = torch.randint(0, vocab_size, (batch, length + 1), generator=generator).numpy()
            runs.logits.append(decoder_logits(runner, ids[:, :length], ids[:, length:]))
        else:
            ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
            runs.logits.append([reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()])
            ids = ids.numpy()
        runs.inputs.append(ids)
    return runs


def compare_to_reference(path: str | Path, runs: ReferenceRuns) -> tuple[float, float]:
    """Run the graph at `path` in onnxruntime (CPU) on `runs`' inputs; returns (max abs error, max abs error /
    max |reference logits|) over every step of every shape."""
    worst = Discrepancy()
    if runs.with_past:
        session = OrtDecoderSession(path, provider="cpu", matmul_accuracy_level=0)  # float32 compute of MatMulNBits
        for (_, length), ids, want in zip(runs.shapes, runs.inputs, runs.logits, strict=True):
            worst = worst.worst(compare_runs(decoder_logits(session, ids[:, :length], ids[:, length:]), want))
    else:
        session = _session(path)
        for ids, (want,) in zip(runs.inputs, runs.logits, strict=True):
            (got,) = session.run([LOGITS], {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids)})
            worst = worst.worst(compare_arrays(got, want))
    return worst.max_abs_error, worst.max_rel_error


def compare_logits(
    path: str | Path,
    reference: torch.nn.Module,
    vocab_size: int,
    shapes: tuple[tuple[int, int], ...] = ((1, 5), (2, 9)),
    seed: int = 0,
) -> tuple[float, float]:
    """Run a logits graph (no past) in onnxruntime (CPU) on random token ids against `reference`.

    Returns (max abs error, max abs error / max |reference logits|) over `shapes` ([batch, sequence]).
    """
    return compare_to_reference(path, record_reference(reference, False, shapes, seed, vocab_size))


def compare_logits_with_past(
    path: str | Path,
    reference: torch.nn.Module,
    vocab_size: int,
    shapes: tuple[tuple[int, int], ...] = ((1, 5), (2, 9)),
    seed: int = 0,
) -> tuple[float, float]:
    """Run a KV-cache graph in onnxruntime (CPU) and `reference` in torch on the same steps.

    Per (batch, length): a prefill of `length` random tokens from an empty past, then one
    decode step; every step's logits are compared (`compare_runs`). Returns (max abs
    error, max relative error) as `compare_logits`.
    """
    return compare_to_reference(path, record_reference(reference, True, shapes, seed, vocab_size))


def check_parity(
    path: str | Path | tuple[Path, Path],
    reference: torch.nn.Module | ReferenceRuns,
    with_past: bool,
    shapes: tuple[tuple[int, int], ...] = ((1, 5), (2, 9)),
) -> ParityCheck:
    """The parity of one file against `reference`: a model, or its `record_reference` runs (decoder-only; then
    `with_past` and `shapes` are the runs' own). For an encoder-decoder, `path` is the (encoder, decoder) pair
    (see `compare_switch`)."""
    if isinstance(path, tuple):
        max_abs, max_rel = compare_switch(*path, reference, shapes)
        return ParityCheck(" + ".join(str(p) for p in path), True, [tuple(s) for s in shapes], max_abs, max_rel)
    if not isinstance(reference, ReferenceRuns):
        reference = record_reference(reference, with_past, shapes)
    max_abs, max_rel = compare_to_reference(path, reference)
    return ParityCheck(str(path), reference.with_past, [tuple(s) for s in reference.shapes], max_abs, max_rel)


def compare_switch(
    encoder_path: str | Path,
    decoder_path: str | Path,
    reference: torch.nn.Module,
    shapes: tuple[tuple[int, int], ...] = ((1, 5), (2, 9)),
    seed: int = 0,
) -> tuple[float, float]:
    """Run Switch's encoder and decoder graphs (see switch_export) and `reference` on the same steps.

    Per (batch, encoder length): the encoder's hidden states, then two decoder steps (the
    start token and one more, from an empty self-attention past; then a third token with
    the cache), each step's logits compared. Returns (max abs, max relative) error.
    """
    config = reference.config
    session = OrtSeq2SeqSession(encoder_path, decoder_path, decoder_start_token_id=config.decoder_start_token_id,
                                matmul_accuracy_level=0)
    runner = TorchSeq2SeqSession(reference)
    generator = torch.Generator().manual_seed(seed)
    worst = Discrepancy()
    for batch, length in shapes:
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator).numpy()
        mask = np.ones_like(ids)
        start = np.full((batch, 1), config.decoder_start_token_id, dtype=np.int64)
        decoder_ids = np.concatenate(
            [start, torch.randint(0, config.vocab_size, (batch, 2), generator=generator).numpy()], axis=1)
        encoded, expected = session.encode(ids, mask), runner.encode(ids, mask)
        worst = worst.worst(compare_arrays(encoded.hidden_states, expected.hidden_states))
        worst = worst.worst(compare_decoders(session.decoder(encoded), runner.decoder(expected),
                                             decoder_ids[:, :2], decoder_ids[:, 2:]))
    return worst.max_abs_error, worst.max_rel_error


__all__ = [
    "ExportReport",
    "ParityCheck",
    "ReferenceRuns",
    "check_parity",
    "compare_logits",
    "compare_logits_with_past",
    "compare_switch",
    "compare_to_reference",
    "describe",
    "describe_files",
    "record_reference",
]
