"""Validation of an exported graph: structure, and onnxruntime against the torch reference."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from .kv_export import empty_past, kv_geometry, past_names, present_names
from .moe_op import DOMAIN, OP_TYPE
from .onnx_file import external_data_path


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
    target: str = "mcsmoe"
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


def describe(model_proto: onnx.ModelProto, path: str | Path) -> ExportReport:
    """Node counts of a saved model (top-level graph) and its size on disk (with external data)."""
    path = Path(path)
    data = external_data_path(path)
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    counts = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model_proto.graph.node)
    custom = {op: count for op, count in counts.items() if "::" in op and not op.startswith("ai.onnx::")}
    return ExportReport(
        path=str(path),
        file_bytes=size,
        nodes=len(model_proto.graph.node),
        custom_nodes=custom,
        functions=len(model_proto.functions),
        op_types=dict(counts.most_common()),
    )


def _session(path: str | Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _error(got: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    error = float(np.abs(got - expected).max())
    return error, error / max(float(np.abs(expected).max()), 1e-30)


@torch.no_grad()
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
    session = _session(path)
    generator = torch.Generator().manual_seed(seed)
    worst_abs, worst_rel = 0.0, 0.0
    for batch, length in shapes:
        ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        expected = reference(input_ids=ids, attention_mask=mask).logits.float().numpy()
        (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        error, rel = _error(got, expected)
        worst_abs, worst_rel = max(worst_abs, error), max(worst_rel, rel)
    return worst_abs, worst_rel


@torch.no_grad()
def compare_logits_with_past(
    path: str | Path,
    reference: torch.nn.Module,
    vocab_size: int,
    shapes: tuple[tuple[int, int], ...] = ((1, 5), (2, 9)),
    seed: int = 0,
) -> tuple[float, float]:
    """Run a KV-cache graph in onnxruntime: a prefill from an empty past, then one decode step.

    Both steps' logits are compared with `reference` run on the whole sequence without
    cache. Returns (max abs error, max relative error) as `compare_logits`.
    """
    session = _session(path)
    num_layers, kv_heads, head_dim = kv_geometry(reference.config)
    outputs = ["logits", *present_names(num_layers)]
    generator = torch.Generator().manual_seed(seed)
    worst_abs, worst_rel = 0.0, 0.0
    for batch, length in shapes:
        ids = torch.randint(0, vocab_size, (batch, length + 1), generator=generator)
        expected = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()
        positions = np.arange(length + 1, dtype=np.int64)[None].repeat(batch, 0)
        prefill = {
            "input_ids": ids[:, :length].numpy(),
            "attention_mask": np.ones((batch, length), dtype=np.int64),
            "position_ids": positions[:, :length],
            **empty_past(num_layers, kv_heads, head_dim, batch),
        }
        logits, *presents = session.run(outputs, prefill)
        decode = {
            "input_ids": ids[:, length:].numpy(),
            "attention_mask": np.ones((batch, length + 1), dtype=np.int64),
            "position_ids": positions[:, length:],
            **dict(zip(past_names(num_layers), presents)),
        }
        (next_logits,) = session.run(["logits"], decode)
        for got, want in ((logits, expected[:, :length]), (next_logits, expected[:, length:])):
            error, rel = _error(got, want)
            worst_abs, worst_rel = max(worst_abs, error), max(worst_rel, rel)
    return worst_abs, worst_rel


def check_parity(
    path: str | Path, reference: torch.nn.Module, with_past: bool, shapes: tuple[tuple[int, int], ...] = ((1, 5), (2, 9))
) -> ParityCheck:
    """The parity of one file against `reference` (see `compare_logits` / `compare_logits_with_past`)."""
    compare = compare_logits_with_past if with_past else compare_logits
    max_abs, max_rel = compare(path, reference, reference.config.vocab_size, shapes)
    return ParityCheck(str(path), with_past, [tuple(s) for s in shapes], max_abs, max_rel)


__all__ = ["ExportReport", "ParityCheck", "check_parity", "compare_logits", "compare_logits_with_past", "describe"]
