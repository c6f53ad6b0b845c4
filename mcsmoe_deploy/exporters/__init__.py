"""ONNX export of compressed MoE models.

moe_op: the custom op `ai.mcsmoe::GroupedLowRankMoE` (one node per MoE block) and
its semantics as a model-local ONNX function made of standard ops (see docs/ops.md).
torch_export: a compressed decoder-only model -> one logits graph (torch.onnx, dynamo).
kv_export: the same with past_key_values in and present out (prefill and decode in one graph).
switch_export: Switch Transformers -> encoder.onnx + decoder.onnx (with KV cache), expert capacity kept.
passes: graph transforms as onnx-ir passes (ort-fused and ort-qmoe mappings, inlining, TensorRT preparation) and their manager.
ort_ops, ort_attention: target "ort": attention and RMSNorms traced as onnxruntime's fused ops
(GroupQueryAttention, RotaryEmbedding, SimplifiedLayerNormalization), the MoE op kept.
ort_fused: dense SwiGLU blocks as onnxruntime's com.microsoft.MoE (a baseline), on an onnx.ModelProto.
dense: dense checkpoints through the same op (G = E, identity grouping).
onnx_file: checked, atomic saving with external data; the functions-inlined copy.
export_config: `ExportConfig`, every choice an export takes.
validate, pipeline: `mcsmoe export`: write, check against the torch reference, describe.
genai_folder: an onnxruntime-genai model folder (genai_config.json, tokenizer files) around a decoder graph.
"""

from .moe_op import (
    DOMAIN,
    OP_TYPE,
    OP_VERSION,
    MoEOpSpec,
    grouped_moe_function,
    make_moe_node,
    register_op_schema,
    standalone_model,
)
from .dense import group_dense_experts
from .kv_export import export_compressed_with_past, greedy_generate_onnx
from .onnx_file import save_checked, write_inlined_copy
from .export_config import TARGETS, ExportConfig
from .genai_folder import genai_config, write_genai_files
from .ort_attention import FusionPlan, ort_modules_fused
from .pipeline import export_model
from .switch_export import export_switch, greedy_generate_switch_onnx
from .torch_export import export_compressed
from .validate import ExportReport, ParityCheck, check_parity, compare_logits, compare_logits_with_past

__all__ = [
    "DOMAIN",
    "ExportConfig",
    "ExportReport",
    "FusionPlan",
    "ParityCheck",
    "TARGETS",
    "check_parity",
    "compare_logits_with_past",
    "group_dense_experts",
    "save_checked",
    "write_inlined_copy",
    "OP_TYPE",
    "OP_VERSION",
    "MoEOpSpec",
    "compare_logits",
    "export_compressed",
    "export_compressed_with_past",
    "export_model",
    "export_switch",
    "genai_config",
    "greedy_generate_onnx",
    "greedy_generate_switch_onnx",
    "grouped_moe_function",
    "write_genai_files",
    "make_moe_node",
    "ort_modules_fused",
    "register_op_schema",
    "standalone_model",
]
