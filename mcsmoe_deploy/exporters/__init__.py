"""ONNX export of compressed MoE models.

moe_op: the custom op `ai.mcsmoe::GroupedLowRankMoE` (one node per MoE block) and
its semantics as a model-local ONNX function made of standard ops (see docs/ops.md).
torch_export: a compressed decoder-only model -> one logits graph (torch.onnx, dynamo).
kv_export: the same with past_key_values in and present out (prefill and decode in one graph).
validate, pipeline: `mcsmoe export`: write, check against the torch reference, describe.
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
from .kv_export import export_compressed_with_past, greedy_generate_onnx
from .pipeline import export_model
from .torch_export import export_compressed
from .validate import ExportReport, compare_logits

__all__ = [
    "DOMAIN",
    "ExportReport",
    "OP_TYPE",
    "OP_VERSION",
    "MoEOpSpec",
    "compare_logits",
    "export_compressed",
    "export_compressed_with_past",
    "export_model",
    "greedy_generate_onnx",
    "grouped_moe_function",
    "make_moe_node",
    "register_op_schema",
    "standalone_model",
]
