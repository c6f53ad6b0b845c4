"""`ExportConfig`: every choice an export takes, validated in its own terms, passed down as one object."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ..errors import UserError
from ..models.base import ExpertLayout

# target name -> what it exports (the CLI's --target help); a new target adds one entry
TARGET_HELP = {
    "ort": "onnxruntime (default): the GroupedLowRankMoE op, attention as com.microsoft.GroupQueryAttention "
           "with RotaryEmbedding, RMSNorms as (Skip)SimplifiedLayerNormalization; onnxruntime only",
    "portable": "the GroupedLowRankMoE op and standard ONNX ops only: for TensorRT and runtimes other than onnxruntime",
    "mcsmoe": "the former name of 'portable' (accepted, recorded as 'portable')",
    "ort-fused": "dense SwiGLU checkpoints only: experts as onnxruntime's com.microsoft.MoE, a baseline",
}
TARGETS = tuple(TARGET_HELP)
TARGET_ALIASES = {"mcsmoe": "portable"}
MIN_OPSET = 18  # the op's function body needs opset 18


@dataclass(frozen=True)
class ExportConfig:
    """How to export a model to ONNX.

    target: "ort" (default: every MoE block one ai.mcsmoe::GroupedLowRankMoE node, attention
        and RMSNorms as onnxruntime's fused contrib ops, see ort_attention; onnxruntime only),
        "portable" (the MoE op and standard ops only; "mcsmoe" is its former name and becomes
        "portable"), or "ort-fused" (dense SwiGLU checkpoints only: onnxruntime's com.microsoft.MoE).
    with_past: one graph for prefill and decode with `past_key_values.N.*` inputs and
        `present.N.*` outputs (see kv_export); False: a plain logits graph.
    validate: compare onnxruntime with the torch reference on random tokens (export_model).
    inline: also write `inlined_path(out)`, every function inlined (no ai.mcsmoe node; with
        target "ort" the copy keeps onnxruntime's contrib ops: standard ops only needs "portable").
    external_data: weights in `OUT.onnx.data`: True, False, or None for "when over ~1.8 GB".
    opset: the default-domain opset of the traced graph (>= 18).
    force: replace existing outputs (export_model).
    progress: a bar over the stages on stderr (export_model).
    passes: more onnx-ir passes, run on each finished graph after the target's own.
    """

    target: str = "ort"
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
        object.__setattr__(self, "target", TARGET_ALIASES.get(self.target, self.target))
        if self.opset < MIN_OPSET:
            raise UserError(f"opset {self.opset} is too old: the op's function body needs opset >= {MIN_OPSET}")
        object.__setattr__(self, "passes", tuple(self.passes))

    def check_checkpoint(self, source: str, family: str, encoder_decoder: bool, compressed: bool) -> None:
        """UserError unless this config can export checkpoint `source` of `family` (compressed or dense)."""
        if self.target == "ort-fused" and compressed:
            raise UserError("target 'ort-fused' maps dense experts to com.microsoft.MoE; "
                            f"{source} is a compressed checkpoint (export it with target 'ort' or 'portable')")
        if encoder_decoder and not self.with_past:
            raise UserError(f"{family} exports an encoder graph and a decoder graph with KV cache; "
                            "a graph without KV cache (with_past=False) is for decoder-only models")

    def check_experts(self, family: str, layout: ExpertLayout) -> None:
        """UserError unless the target can express experts of `layout` (ort-fused: SwiGLU only)."""
        if self.target == "ort-fused" and not (layout.gated and layout.activation in ("silu", "swish")):
            raise UserError(f"target 'ort-fused' needs a dense checkpoint with SwiGLU experts; {family} experts are "
                            f"{'gated' if layout.gated else 'plain'} {layout.activation}")

    @property
    def fuses_ort(self) -> bool:
        """Whether attention and RMSNorms trace to onnxruntime's fused ops (target "ort")."""
        return self.target == "ort"

    def graph_passes(self) -> list[ir.passes.PassBase]:
        """The passes each finished graph goes through: the target's (fresh instances), then `passes`."""
        target_passes: list[ir.passes.PassBase] = []
        if self.target == "ort-fused":
            from .passes.ort_moe import ort_fusion_passes

            target_passes = ort_fusion_passes()
        elif self.fuses_ort:
            from .passes.skip_norm import SkipNormFusionPass

            target_passes = [SkipNormFusionPass()]
        return [*target_passes, *self.passes]


__all__ = ["MIN_OPSET", "TARGETS", "TARGET_ALIASES", "TARGET_HELP", "ExportConfig"]
