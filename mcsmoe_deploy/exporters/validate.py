"""Validation of an exported graph: structure, and onnxruntime against the torch reference."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from ..contract import DOMAIN, OP_TYPE, decoder_present_names, external_data_path, past_name, past_names, present_names
from ..models import adapter_for_config
from .kv_export import empty_past


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


def describe_files(model_protos: list[onnx.ModelProto], paths: list[Path], root: str | Path) -> ExportReport:
    """One report over several graphs written together (Switch's encoder and decoder): counts and bytes summed."""
    parts = [describe(proto, path) for proto, path in zip(model_protos, paths)]
    custom: Counter = Counter()
    ops: Counter = Counter()
    for part in parts:
        custom.update(part.custom_nodes)
        ops.update(part.op_types)
    return ExportReport(
        path=str(root),
        file_bytes=sum(p.file_bytes for p in parts),
        nodes=sum(p.nodes for p in parts),
        custom_nodes=dict(custom),
        functions=sum(p.functions for p in parts),
        op_types=dict(ops.most_common()),
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
    num_layers, kv_heads, head_dim = adapter_for_config(reference.config).kv_geometry(reference.config)
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
    path: str | Path | tuple[Path, Path],
    reference: torch.nn.Module,
    with_past: bool,
    shapes: tuple[tuple[int, int], ...] = ((1, 5), (2, 9)),
) -> ParityCheck:
    """The parity of one file against `reference` (see `compare_logits` / `compare_logits_with_past`);
    for an encoder-decoder, `path` is the (encoder, decoder) pair (see `compare_switch`)."""
    if isinstance(path, tuple):
        max_abs, max_rel = compare_switch(*path, reference, shapes)
        return ParityCheck(" + ".join(str(p) for p in path), True, [tuple(s) for s in shapes], max_abs, max_rel)
    compare = compare_logits_with_past if with_past else compare_logits
    max_abs, max_rel = compare(path, reference, reference.config.vocab_size, shapes)
    return ParityCheck(str(path), with_past, [tuple(s) for s in shapes], max_abs, max_rel)




@torch.no_grad()
def compare_switch(
    encoder_path: str | Path,
    decoder_path: str | Path,
    reference: torch.nn.Module,
    shapes: tuple[tuple[int, int], ...] = ((1, 5), (2, 9)),
    seed: int = 0,
) -> tuple[float, float]:
    """Run Switch's encoder and decoder graphs (see switch_export) against `reference`.

    Per (batch, encoder length): the encoder's hidden states, then two decoder steps (the
    start token and one more, from an empty self-attention past; then a third token with
    the presents) against the reference's full forward. Returns (max abs, max relative) error.
    """
    encoder, decoder = _session(encoder_path), _session(decoder_path)
    config = reference.config
    layers, heads, head_dim = config.num_decoder_layers, config.num_heads, config.d_kv
    presents = decoder_present_names(layers)
    generator = torch.Generator().manual_seed(seed)
    worst_abs, worst_rel = 0.0, 0.0
    for batch, length in shapes:
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        start = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.long)
        decoder_ids = torch.cat([start, torch.randint(0, config.vocab_size, (batch, 2), generator=generator)], dim=1)
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        names = [o.name for o in encoder.get_outputs()]
        encoded = dict(zip(names, encoder.run(names, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})))
        checks = [(encoded["encoder_hidden_states"], expected.encoder_last_hidden_state.float().numpy())]
        cross = {past_name(n): v for n, v in encoded.items() if n.startswith("present.")}
        dtype = next(iter(cross.values())).dtype
        past = {past_name(n): np.zeros((batch, heads, 0, head_dim), dtype=dtype) for n in presents}
        logits = expected.logits.float().numpy()
        for begin, end in ((0, 2), (2, 3)):
            feeds = {"input_ids": decoder_ids[:, begin:end].numpy(), "encoder_attention_mask": mask.numpy(),
                     **past, **cross}
            got, *new = decoder.run(["logits", *presents], feeds)
            checks.append((got, logits[:, begin:end]))
            past = {past_name(n): p for n, p in zip(presents, new)}
        for got, want in checks:
            error, rel = _error(got, want)
            worst_abs, worst_rel = max(worst_abs, error), max(worst_rel, rel)
    return worst_abs, worst_rel


__all__ = [
    "ExportReport",
    "ParityCheck",
    "check_parity",
    "compare_logits",
    "compare_logits_with_past",
    "compare_switch",
    "describe",
    "describe_files",
]
