"""Dense SwiGLU `ai.mcsmoe::GroupedLowRankMoE` nodes -> onnxruntime's `com.microsoft.MoE`.

The export target "ort-fused" uses it to build the fastest dense baseline on
CPU: onnxruntime's MoE kernel routes each token to its k experts only, where our
reference function body runs every group on every token.

A node qualifies when it is gated, its activation is silu, its three projections are
dense, and `expert_to_group` is the identity initializer arange(E) (G = E: a dense,
uncompressed model). Facts about the kernel (onnxruntime 1.32 CPU, checked
numerically in tests/test_ort_fused.py):

- `router_probs` takes the raw router logits: the kernel applies softmax over the E
  experts, picks the top k and, with `normalize_routing_weights=1`, divides the k
  probabilities by their sum; the same routing as our op (docs/ops.md).
- `fc1_experts_weights` [E, 2I, H] holds gate and up interleaved per output row
  (`swiglu_fusion=1`, the only fused layout the CPU kernel accepts): row 2i is gate
  row i, row 2i+1 is up row i. `fc2_experts_weights` [E, H, I] is our `down` as is.
- Its SwiGLU is `G * sigmoid(alpha * G) * (L + beta)` with G, L clamped to
  `swiglu_limit`; alpha=1, beta=0 and no limit (the schema defaults) give plain
  `silu(gate) * up`. They are written explicitly so a changed default cannot alter
  the model (the GPT-OSS variant is alpha=1.702, beta=1, limit=7).
- The CPU kernel runs float32 only.
- On exactly tied probabilities the kernel prefers the higher expert index, ONNX
  TopK the lower; random logits never tie.

The rewrite is an onnx-ir pass (passes/ort_moe.py: `FuseMoEForOrtPass`, run by the export
pipeline on a graph whose weights stay on disk); the functions here apply it to an
`onnx.ModelProto` held in memory.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from .passes import GraphPassManager
from .passes.ort_moe import ORT_DOMAIN, ORT_MOE, MoEFusion, ort_fusion_passes, plan_fusion


def plan_ort_fusion(model_proto: onnx.ModelProto) -> list[MoEFusion]:
    """Check every GroupedLowRankMoE node of the main graph and describe its fusion; changes nothing.

    Raises ValueError naming the first node that cannot become com.microsoft.MoE
    (compressed, not gated, not silu, merged/removed experts, not float32).
    """
    return plan_fusion(ir.from_proto(model_proto))


def fuse_moe_for_ort(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every GroupedLowRankMoE node into one com.microsoft.MoE node, in place; returns `model_proto`.

    Runs `ort_fusion_passes()` (the fusion, then unused weights, functions and opset
    imports removed) and copies the result back into `model_proto`. A ValueError (a node
    that cannot be fused, see `plan_ort_fusion`) leaves it unchanged. The weights must be in
    the proto; for a large model prefer the pass on an `ir.Model` whose weights stay on disk.
    """
    model = ir.from_proto(model_proto)
    plan_fusion(model)  # refuse before anything changes, with the node's own ValueError
    result = GraphPassManager(ort_fusion_passes())(model)
    if result.modified:
        model_proto.CopyFrom(ir.to_proto(result.model))
    return model_proto


__all__ = ["ORT_DOMAIN", "ORT_MOE", "MoEFusion", "fuse_moe_for_ort", "plan_ort_fusion"]
