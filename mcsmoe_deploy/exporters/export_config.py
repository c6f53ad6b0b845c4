"""`ExportConfig`: every choice an export takes, validated in its own terms, passed down as one object."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ..compress.recipe import QUANT_SCOPES, QUANTIZATIONS
from ..errors import ParameterError, UserError
from ..models.base import ExpertLayout
from ..quantization import DEFAULT_BLOCK, QuantSpec

TARGETS = ("mcsmoe", "ort-fused")
MIN_OPSET = 18  # the op's function body needs opset 18


@dataclass(frozen=True)
class ExportConfig:
    """How to export a model to ONNX.

    target: "mcsmoe" (every MoE block one ai.mcsmoe::GroupedLowRankMoE node), or
        "ort-fused" (dense SwiGLU checkpoints only: onnxruntime's com.microsoft.MoE).
    with_past: one graph for prefill and decode with `past_key_values.N.*` inputs and
        `present.N.*` outputs (see kv_export); False: a plain logits graph.
    validate: compare onnxruntime with the torch reference on random tokens (export_model).
    inline: also write `inlined_path(out)`, every function inlined (standard ops only).
    external_data: weights in `OUT.onnx.data`: True, False, or None for "when over ~1.8 GB".
    opset: the default-domain opset of the traced graph (>= 18).
    force: replace existing outputs (export_model).
    progress: a bar over the stages on stderr (export_model).
    passes: more onnx-ir passes, run on each finished graph after the target's own.
    quantize: None, "int4" or "int8": quantize a dense or compressed, not yet quantized checkpoint
        in memory before tracing (the arithmetic of `mcsmoe compress --quantize`; dense experts as
        one group each), and validate against that quantized torch model (export_model).
    quant_block, quant_symmetric, quant_scope: as in CompressionRecipe (values per block, zero
        points or not, "all" linear layers but routers and embeddings, or "experts" only).
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
    quantize: str | None = None
    quant_block: int = DEFAULT_BLOCK
    quant_symmetric: bool = True
    quant_scope: str = "all"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise UserError(f"unknown export target {self.target!r}; one of {', '.join(TARGETS)}")
        if self.opset < MIN_OPSET:
            raise UserError(f"opset {self.opset} is too old: the op's function body needs opset >= {MIN_OPSET}")
        if self.quantize is not None:
            if self.quantize not in QUANTIZATIONS:
                raise ParameterError("quantize", f"must be one of {', '.join(QUANTIZATIONS)}, not {self.quantize!r}")
            if self.quant_block < 16 or self.quant_block & (self.quant_block - 1):
                raise ParameterError("quant_block", f"must be a power of two >= 16, not {self.quant_block}")
            if self.quant_scope not in QUANT_SCOPES:
                raise ParameterError("quant_scope", f"must be one of {', '.join(QUANT_SCOPES)}, not {self.quant_scope!r}")
            if self.target == "ort-fused":
                raise UserError("target 'ort-fused' maps dense float experts to com.microsoft.MoE; quantize with "
                                "target 'mcsmoe'")
        object.__setattr__(self, "passes", tuple(self.passes))

    @property
    def quant_spec(self) -> QuantSpec | None:
        """How the export quantizes the model in memory; None: it does not."""
        if self.quantize is None:
            return None
        return QuantSpec(QUANTIZATIONS[self.quantize], self.quant_block, self.quant_symmetric)

    def check_checkpoint(self, source: str, family: str, encoder_decoder: bool, compressed: bool) -> None:
        """UserError unless this config can export checkpoint `source` of `family` (compressed or dense)."""
        if self.target == "ort-fused" and compressed:
            raise UserError("target 'ort-fused' maps dense experts to com.microsoft.MoE; "
                            f"{source} is a compressed checkpoint (export it with target 'mcsmoe')")
        if self.quantize is not None and encoder_decoder:
            raise UserError(f"quantized export is built for decoder-only families (mixtral, qwen2_moe, qwen3_moe, "
                            f"olmoe), not {family}")
        if encoder_decoder and not self.with_past:
            raise UserError(f"{family} exports an encoder graph and a decoder graph with KV cache; "
                            "a graph without KV cache (with_past=False) is for decoder-only models")

    def check_experts(self, family: str, layout: ExpertLayout) -> None:
        """UserError unless the target can express experts of `layout` (ort-fused: SwiGLU only)."""
        if self.target == "ort-fused" and not (layout.gated and layout.activation in ("silu", "swish")):
            raise UserError(f"target 'ort-fused' needs a dense checkpoint with SwiGLU experts; {family} experts are "
                            f"{'gated' if layout.gated else 'plain'} {layout.activation}")

    def graph_passes(self) -> list[ir.passes.PassBase]:
        """The passes each finished graph goes through: the target's (fresh instances), then `passes`."""
        target_passes: list[ir.passes.PassBase] = []
        if self.target == "ort-fused":
            from .passes.ort_moe import ort_fusion_passes

            target_passes = ort_fusion_passes()
        return [*target_passes, *self.passes]


__all__ = ["MIN_OPSET", "TARGETS", "ExportConfig"]
