"""`ExportConfig`: every choice an export takes, validated in its own terms, passed down as one object."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ..errors import UserError
from ..models.base import ExpertLayout

TARGETS = ("mcsmoe", "ort-fused", "ort-qmoe")
MIN_OPSET = 18  # the op's function body needs opset 18


@dataclass(frozen=True)
class ExportConfig:
    """How to export a model to ONNX.

    target: "mcsmoe" (every MoE block one ai.mcsmoe::GroupedLowRankMoE node), or
        "ort-fused" (dense SwiGLU checkpoints only: onnxruntime's com.microsoft.MoE), or "ort-qmoe"
        (quantized checkpoints with dense SwiGLU experts, merged or not: com.microsoft.QMoE, passes/ort_qmoe.py).
    with_past: one graph for prefill and decode with `past_key_values.N.*` inputs and
        `present.N.*` outputs (see kv_export); False: a plain logits graph.
    validate: compare onnxruntime with the torch reference on random tokens (export_model).
    inline: also write `inlined_path(out)`, every function inlined (standard ops only).
    external_data: weights in `OUT.onnx.data`: True, False, or None for "when over ~1.8 GB".
    opset: the default-domain opset of the traced graph (>= 18).
    force: replace existing outputs (export_model).
    progress: a bar over the stages on stderr (export_model).
    passes: more onnx-ir passes, run on each finished graph after the target's own.
    """

    target: str = "mcsmoe"
    with_past: bool = True
    validate: bool = True
    inline: bool = False
    external_data: bool | None = None
    opset: int = MIN_OPSET
    force: bool = False
    progress: bool = False
    passes: tuple[ir.passes.PassBase, ...] = ()

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise UserError(f"unknown export target {self.target!r}; one of {', '.join(TARGETS)}")
        if self.opset < MIN_OPSET:
            raise UserError(f"opset {self.opset} is too old: the op's function body needs opset >= {MIN_OPSET}")
        object.__setattr__(self, "passes", tuple(self.passes))

    def check_checkpoint(self, source: str, family: str, encoder_decoder: bool, compressed: bool) -> None:
        """UserError unless this config can export checkpoint `source` of `family` (compressed or dense)."""
        if self.target == "ort-fused" and compressed:
            raise UserError("target 'ort-fused' maps dense experts to com.microsoft.MoE; "
                            f"{source} is a compressed checkpoint (export it with target 'mcsmoe')")
        if self.target == "ort-qmoe":
            _check_qmoe_checkpoint(source, compressed)
        if encoder_decoder and not self.with_past:
            raise UserError(f"{family} exports an encoder graph and a decoder graph with KV cache; "
                            "a graph without KV cache (with_past=False) is for decoder-only models")

    def check_experts(self, family: str, layout: ExpertLayout) -> None:
        """UserError unless the target can express experts of `layout` (ort-fused, ort-qmoe: SwiGLU only)."""
        if self.target in ("ort-fused", "ort-qmoe") and not (layout.gated and layout.activation in ("silu", "swish")):
            what = "a dense checkpoint" if self.target == "ort-fused" else "a quantized checkpoint"
            raise UserError(f"target {self.target!r} needs {what} with SwiGLU experts; {family} experts are "
                            f"{'gated' if layout.gated else 'plain'} {layout.activation}")

    def graph_passes(self) -> list[ir.passes.PassBase]:
        """The passes each finished graph goes through: the target's (fresh instances), then `passes`."""
        target_passes: list[ir.passes.PassBase] = []
        if self.target == "ort-fused":
            from .passes.ort_moe import ort_fusion_passes

            target_passes = ort_fusion_passes()
        elif self.target == "ort-qmoe":
            from .passes.ort_qmoe import ort_qmoe_passes

            target_passes = ort_qmoe_passes()
        return [*target_passes, *self.passes]


def _check_qmoe_checkpoint(source: str, compressed: bool) -> None:
    """UserError unless checkpoint `source` stores every MoE projection dense and quantized (QMoE's input)."""
    from ..models import read_config_dict
    from .passes.ort_qmoe import qmoe_refusal

    section = read_config_dict(source).get("mcsmoe") if compressed else None
    reason = "it is not compressed" if section is None else qmoe_refusal(section)
    if reason is not None:
        raise UserError(f"target 'ort-qmoe' maps quantized dense SwiGLU experts to com.microsoft.QMoE; {source}: "
                        f"{reason} (quantize with `mcsmoe compress --quantize int4|int8 --rank-ratio 1`, or export "
                        "with target 'mcsmoe')")


__all__ = ["MIN_OPSET", "TARGETS", "ExportConfig"]
