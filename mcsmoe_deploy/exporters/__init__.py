"""ONNX export of compressed MoE models.

moe_op: the custom op `ai.mcsmoe::GroupedLowRankMoE` (one node per MoE block) and
its semantics as a model-local ONNX function made of standard ops (see docs/ops.md).
torch_export: a compressed decoder-only model -> one logits graph (torch.onnx, dynamo).
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
    "export_model",
    "grouped_moe_function",
    "make_moe_node",
    "register_op_schema",
    "standalone_model",
]
