"""Validation of an exported graph: structure, and onnxruntime against the torch reference."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from .moe_op import DOMAIN, OP_TYPE


@dataclass
class ExportReport:
    """What was written and how closely onnxruntime follows the torch reference.

    max_abs_error / max_rel_error: over all checked shapes, max |ort - torch| and that
    divided by max |torch| of the same run.
    """

    path: str
    file_bytes: int
    nodes: int
    custom_nodes: int
    functions: int
    op_types: dict[str, int] = field(default_factory=dict)
    shapes_checked: list[tuple[int, int]] = field(default_factory=list)
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def describe(model_proto: onnx.ModelProto, path: str | Path) -> ExportReport:
    """Node counts of a saved model (top-level graph) and its file size (with external data)."""
    path = Path(path)
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    counts = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model_proto.graph.node)
    custom = sum(1 for n in model_proto.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE)
    return ExportReport(
        path=str(path),
        file_bytes=size,
        nodes=len(model_proto.graph.node),
        custom_nodes=custom,
        functions=len(model_proto.functions),
        op_types=dict(counts.most_common()),
    )


@torch.no_grad()
def compare_logits(
    path: str | Path,
    reference: torch.nn.Module,
    vocab_size: int,
    shapes: tuple[tuple[int, int], ...] = ((1, 5), (2, 9)),
    seed: int = 0,
) -> tuple[float, float]:
    """Run the graph in onnxruntime (CPU) on random token ids and compare with `reference`'s logits.

    Returns (max abs error, max abs error / max |reference logits|) over `shapes` ([batch, sequence]).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst_abs, worst_rel = 0.0, 0.0
    for batch, length in shapes:
        ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        expected = reference(input_ids=ids, attention_mask=mask).logits.float().numpy()
        (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        error = float(np.abs(got - expected).max())
        worst_abs = max(worst_abs, error)
        worst_rel = max(worst_rel, error / max(float(np.abs(expected).max()), 1e-30))
    return worst_abs, worst_rel
