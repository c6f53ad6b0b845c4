"""Graph transforms as onnx-ir passes (`ir.passes.InPlacePass` / `FunctionalPass`, each returning a `PassResult`).

manager: `GraphPassManager` runs a list of passes, names the one that failed, reports which changed the model.
requirements: the preconditions passes check in `requires()` (weight values readable) and `moe_nodes`.
custom_nodes: the traced MoE nodes get their overloads and functions (the first pass of every export).
ort_moe: dense SwiGLU GroupedLowRankMoE -> onnxruntime's com.microsoft.MoE (`--target ort-fused`).
ort_qmoe: quantized dense SwiGLU GroupedLowRankMoE -> onnxruntime's com.microsoft.QMoE (`--target ort-qmoe`).
packed_qkv: q/k/v projections + RotaryEmbedding -> one projection, rotary inside GroupQueryAttention (`--target ort`).
skip_norm: residual Add + SimplifiedLayerNormalization -> com.microsoft.SkipSimplifiedLayerNormalization (`--target ort`).
inline: every model-local function inlined, unused functions and opset imports dropped (standard ops only).
metadata: where a graph came from, in `metadata_props`.
tensorrt: preparing a graph for TensorRT's ONNX parser (plugin tagging, parser-friendly rewrites).
"""

from .manager import GraphPassError, GraphPassManager, PassesApplied, pass_name

__all__ = ["GraphPassError", "GraphPassManager", "PassesApplied", "pass_name"]
