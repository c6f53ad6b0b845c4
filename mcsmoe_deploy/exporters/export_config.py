"""`ExportConfig`: every choice an export takes, validated in its own terms, passed down as one object."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import torch

from ..compress.recipe import QUANT_SCOPES, QUANTIZATIONS
from ..errors import ParameterError, UserError
from ..models.base import ExpertLayout
from ..quantization import DEFAULT_BLOCK, QuantSpec
from .passes.matmul_nbits import DEFAULT_ACCURACY_LEVEL

# target name -> what it exports (the CLI's --target help); a new target adds one entry
TARGET_HELP = {
    "ort": "onnxruntime (default): the GroupedLowRankMoE op, attention as com.microsoft.GroupQueryAttention "
           "(q/k/v packed, rotary inside, or RotaryEmbedding), RMSNorms as (Skip)SimplifiedLayerNormalization; "
           "quantized weights as com.microsoft.MatMulNBits, int4 SwiGLU experts that are not low rank (dense or "
           "merged) as com.microsoft.QMoE; onnxruntime only",
    "portable": "the GroupedLowRankMoE op and standard ONNX ops only: for TensorRT and runtimes other than onnxruntime",
    "mcsmoe": "the former name of 'portable' (accepted, recorded as 'portable')",
    "ort-fused": "dense SwiGLU checkpoints only: experts as onnxruntime's com.microsoft.MoE, a baseline",
    "ort-qmoe": "quantized checkpoints whose experts are dense SwiGLU (mcsmoe compress --quantize int4|int8, merged "
                "or not, no low rank): experts as onnxruntime's com.microsoft.QMoE (int4 at --accuracy-level; int8 always "
                "runs with int8 activations, ~1%% error), attention and norms fused as in 'ort'",
}
TARGETS = tuple(TARGET_HELP)
TARGET_ALIASES = {"mcsmoe": "portable"}
# graph dtypes -> torch dtypes. bf16 is not offered: ONNX's TopK (the op's routing) takes no bf16
# before opset 24 and onnxruntime's CPU provider has no bf16 MatMul, Softmax or TopK kernels, so
# a bf16 graph could neither run nor be validated here
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MIN_OPSET = 18  # the op's function body needs opset 18
# compute accuracy of the quantized kernels target ort writes (onnxruntime's `accuracy_level`): the default
# first, 4 = int8-quantized activations, 0 = float32 compute
ACCURACY_LEVELS = (DEFAULT_ACCURACY_LEVEL, 0)


@dataclass(frozen=True)
class ExportConfig:
    """How to export a model to ONNX.

    target: "ort" (default: every MoE block one ai.mcsmoe::GroupedLowRankMoE node, attention
        and RMSNorms as onnxruntime's fused contrib ops, see ort_attention; onnxruntime only),
        "portable" (the MoE op and standard ops only; "mcsmoe" is its former name and becomes
        "portable"), "ort-fused" (dense SwiGLU checkpoints only: onnxruntime's com.microsoft.MoE), or "ort-qmoe"
        (quantized checkpoints with dense SwiGLU experts, merged or not: com.microsoft.QMoE, passes/ort_qmoe.py;
        attention and norms as "ort").
    with_past: one graph for prefill and decode with `past_key_values.N.*` inputs and
        `present.N.*` outputs (see kv_export); False: a plain logits graph.
    validate: compare onnxruntime with the torch reference on random tokens (export_model).
    inline: also write `inlined_path(out)`, every function inlined (no ai.mcsmoe node; with
        target "ort" the copy keeps onnxruntime's contrib ops: standard ops only needs "portable").
    external_data: weights in `OUT.onnx.data`: True, False, or None (default) for "when the graph
        holds quantized weights onnxruntime repacks at load (MatMulNBits, QMoE: it memory-maps external
        data and drops the pages it repacked, where embedded bytes stay beside the packed copy), or
        its weights pass 64 MiB"; see `torch_export.default_external_data`.
    opset: the default-domain opset of the traced graph (>= 18).
    force: replace existing outputs (export_model).
    progress: a bar over the stages on stderr (export_model).
    passes: more onnx-ir passes, run on each finished graph after the target's own.
    dtype: "fp32" (default) or "fp16", the graph's floating type: weights, activations, KV cache
        and logits (see DTYPES for bf16); the checkpoint is cast (bf16 -> fp16 rounds).
    genai: the output is an onnxruntime-genai model folder (OUT/model.onnx, genai_config.json,
        tokenizer files; see genai_folder) instead of one ONNX file; decoder-only, with_past.
    quantize: None, "int4" or "int8": quantize a dense or compressed, not yet quantized checkpoint
        in memory before tracing (the arithmetic of `mcsmoe compress --quantize`; dense experts as
        one group each), and validate against that quantized torch model (export_model).
    quant_block, quant_symmetric, quant_scope: as in CompressionRecipe (values per block, zero
        points or not, "all" linear layers but routers and embeddings, "all+embeddings", or "experts" only).
    accuracy_level: the compute accuracy written on the quantized kernels of targets "ort" and "ort-qmoe"
        (com.microsoft.MatMulNBits and QMoE): 4 (default, int8-quantized activations: onnxruntime's own
        default and the fastest) or 0 (float32 compute: exact, slower, and QMoE then holds no packed copy
        of its weights). A session can still override it (`open_session(..., matmul_accuracy_level=0)`).
    expert_accuracy_level: the same for the experts' kernels only (their MatMulNBits, QMoE); None (default):
        `accuracy_level`. Experts at 0 and the rest at 4 trade some decode speed for session memory, since
        level 4 also holds a float block sum beside each block's scale (~0.125 byte a weight): merged + low-rank
        int4 on the ~300M benchmark model, peak RSS 1.41x its bytes on disk against 1.66x, decode 0.42-0.48x the
        builder's int4 against 0.34-0.39x (benchmarks/results/session-memory.md).
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
    genai: bool = False
    dtype: str = "fp32"
    quantize: str | None = None
    quant_block: int = DEFAULT_BLOCK
    quant_symmetric: bool = False
    quant_scope: str = "all"
    accuracy_level: int = ACCURACY_LEVELS[0]
    expert_accuracy_level: int | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise UserError(f"unknown export target {self.target!r}; one of {', '.join(TARGETS)}")
        object.__setattr__(self, "target", TARGET_ALIASES.get(self.target, self.target))
        if self.opset < MIN_OPSET:
            raise UserError(f"opset {self.opset} is too old: the op's function body needs opset >= {MIN_OPSET}")
        if self.dtype == "bf16":
            raise UserError("bf16 graphs are not offered: ONNX TopK takes no bf16 before opset 24 and onnxruntime's "
                            "CPU provider has no bf16 MatMul/Softmax/TopK kernels; export fp16 or fp32")
        if self.dtype not in DTYPES:
            raise UserError(f"unknown graph dtype {self.dtype!r}; one of {', '.join(DTYPES)}")
        if self.dtype != "fp32" and self.target in ("ort-fused", "ort-qmoe"):
            raise UserError(f"target {self.target!r} exports fp32 graphs only")
        if self.quantize is not None:
            if self.quantize not in QUANTIZATIONS:
                raise ParameterError("quantize", f"must be one of {', '.join(QUANTIZATIONS)}, not {self.quantize!r}")
            if self.quant_block < 16 or self.quant_block & (self.quant_block - 1):
                raise ParameterError("quant_block", f"must be a power of two >= 16, not {self.quant_block}")
            if self.quant_scope not in QUANT_SCOPES:
                raise ParameterError("quant_scope", f"must be one of {', '.join(QUANT_SCOPES)}, not {self.quant_scope!r}")
            if self.target == "ort-fused":
                raise UserError("target 'ort-fused' maps dense float experts to com.microsoft.MoE; quantize with "
                                "target 'ort'")
        levels = {"accuracy_level": self.accuracy_level}
        if self.expert_accuracy_level is not None:  # None: the experts take accuracy_level
            levels["expert_accuracy_level"] = self.expert_accuracy_level
        for field, level in levels.items():
            if level not in ACCURACY_LEVELS:
                raise ParameterError(field, f"must be 4 (int8 activations) or 0 (float32 compute), not {level}")
        if self.quantize is not None and self.dtype != "fp32":
            raise UserError("quantized graphs are fp32 (their scales feed fp32 MatMuls); drop --dtype or --quantize")
        object.__setattr__(self, "passes", tuple(self.passes))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The graph's floating type as a torch dtype."""
        return DTYPES[self.dtype]

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
                            f"{source} is a compressed checkpoint (export it with target 'ort' or 'portable')")
        if self.genai and not self.with_past:
            raise UserError("an onnxruntime-genai folder needs the KV-cache graph; drop --no-past")
        if encoder_decoder and self.dtype == "fp16":
            # T5-family activations pass fp16's range (65504) in the feed-forward blocks
            raise UserError(f"{family} exports fp32 graphs only: its activations overflow fp16")
        if self.target == "ort-qmoe":
            _check_qmoe_checkpoint(source, compressed)
        if self.quantize is not None and encoder_decoder:
            raise UserError(f"quantized export is built for decoder-only families (mixtral, qwen2_moe, qwen3_moe, "
                            f"olmoe), not {family}")
        if encoder_decoder and not self.with_past:
            raise UserError(f"{family} exports an encoder graph and a decoder graph with KV cache; "
                            "a graph without KV cache (with_past=False) is for decoder-only models")

    def check_experts(self, family: str, layout: ExpertLayout) -> None:
        """UserError unless the target can express experts of `layout` (ort-fused, ort-qmoe: SwiGLU only)."""
        if self.target in ("ort-fused", "ort-qmoe") and not (layout.gated and layout.activation in ("silu", "swish")):
            what = "a dense checkpoint" if self.target == "ort-fused" else "a quantized checkpoint"
            raise UserError(f"target {self.target!r} needs {what} with SwiGLU experts; {family} experts are "
                            f"{'gated' if layout.gated else 'plain'} {layout.activation}")

    @property
    def per_group_experts(self) -> bool:
        """Whether float expert factors become per-group [in, out] initializers (op version 3, docs/ops.md):
        target "ort", where onnxruntime would otherwise fold a copy of every sliced weight."""
        return self.target == "ort"

    @property
    def experts_level(self) -> int:
        """The accuracy level written on the experts' quantized kernels."""
        return self.accuracy_level if self.expert_accuracy_level is None else self.expert_accuracy_level

    @property
    def fuses_ort(self) -> bool:
        """Whether attention and RMSNorms trace to onnxruntime's fused ops (targets "ort" and "ort-qmoe")."""
        return self.target in ("ort", "ort-qmoe")

    def graph_passes(self) -> list[ir.passes.PassBase]:
        """The passes each finished graph goes through: the target's (fresh instances), then `passes`."""
        from .passes.metadata import StripTraceMetadataPass

        target_passes: list[ir.passes.PassBase] = []
        if self.target == "ort-fused":
            from .passes.ort_moe import ort_fusion_passes

            target_passes = ort_fusion_passes()
        elif self.target == "ort-qmoe":
            from .passes.ort_qmoe import ort_qmoe_passes

            target_passes = ort_qmoe_passes(accuracy_level=self.experts_level)
        if self.target == "ort":
            from .passes.ort_moe import FuseMoEForOrtPass
            from .passes.ort_qmoe import ort_qmoe_passes

            # dense float32 SwiGLU blocks as MoE, int4 dense-expert blocks (merged too) as QMoE: onnxruntime's
            # kernels run the picked experts in place, faster than the op's body
            target_passes += [FuseMoEForOrtPass(dense_float_only=True),
                              *ort_qmoe_passes(int4_only=True, accuracy_level=self.experts_level)]
        if self.fuses_ort:
            from .passes.matmul_nbits import MatMulNBitsPass
            from .passes.moe_reshapes import SkipMoEReshapesPass
            from .passes.packed_qkv import PackedQKVPass
            from .passes.sibling_matmuls import FuseSiblingMatMulNBitsPass
            from .passes.skip_norm import SkipNormFusionPass

            # packing q/k/v concatenates DequantizeLinear weights, which MatMulNBitsPass then rewrites
            target_passes += [SkipMoEReshapesPass(), PackedQKVPass(), SkipNormFusionPass(),
                              MatMulNBitsPass(self.accuracy_level, self.experts_level),
                              FuseSiblingMatMulNBitsPass()]
        return [StripTraceMetadataPass(), *target_passes, *self.passes]


def _check_qmoe_checkpoint(source: str, compressed: bool) -> None:
    """UserError unless checkpoint `source` stores every MoE projection dense and quantized (QMoE's input)."""
    from ..models import read_config_dict
    from .passes.ort_qmoe import qmoe_refusal

    section = read_config_dict(source).get("mcsmoe") if compressed else None
    reason = "it is not compressed" if section is None else qmoe_refusal(section)
    if reason is not None:
        raise UserError(f"target 'ort-qmoe' maps quantized dense SwiGLU experts to com.microsoft.QMoE; {source}: "
                        f"{reason} (quantize with `mcsmoe compress --quantize int4|int8 --rank-ratio 1`, or export "
                        "with target 'ort')")


__all__ = ["DTYPES", "MIN_OPSET", "TARGETS", "TARGET_ALIASES", "TARGET_HELP", "ExportConfig"]
