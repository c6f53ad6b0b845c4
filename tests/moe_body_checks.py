"""Shared checks of the op's function body against the torch module (shared-basis and base-delta tests)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mcsmoe_deploy.exporters import MoEOpSpec, standalone_model
from mcsmoe_deploy.exporters.moe_body import build_body
from mcsmoe_deploy.grouped_experts import GroupedLowRankExperts, route_top_k


def randomize(module: GroupedLowRankExperts, gen: torch.Generator) -> None:
    """Seeded random factors (x 0.3) and sparse row indices for every projection of `module`, in place."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        for proj in module.projections.values():
            if proj.spec.sparse_rows:
                proj.sparse_rows.copy_(torch.randint(0, proj.spec.out_features, proj.sparse_rows.shape, generator=gen))


def assert_body_matches_module(module: GroupedLowRankExperts, spec: MoEOpSpec, strategy: str, tokens: int,
                               gen: torch.Generator) -> None:
    """The `strategy` body of `spec` in onnxruntime equals `module` (top-2, renormalised) within 1e-5 relative
    on `tokens` random tokens of hidden size 16 over 6 experts."""
    model = standalone_model(spec)
    del model.functions[0].node[:]
    model.functions[0].node.extend(build_body(spec, strategy))
    onnx.checker.check_model(model, full_check=True)
    hidden, logits = torch.randn(tokens, 16, generator=gen), torch.randn(tokens, 6, generator=gen) * 2
    feeds = {"hidden": hidden, "router_logits": logits, "expert_to_group": module.expert_to_group}
    for name, proj in module.projections.items():
        for input_name in spec.projection_inputs(name):
            feeds[input_name] = getattr(proj, input_name[len(name) + 1:])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.detach().numpy() for k, v in feeds.items()})[0]
    index, weights = route_top_k(logits, 2, True)
    with torch.no_grad():
        want = module(hidden, index, weights).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
