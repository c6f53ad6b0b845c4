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


def assert_reloads_and_stands_for_dense(compressed, out) -> None:
    """Checkpoint `out` of `compressed` (a CalibratedModel result) reloads to bit-equal logits, and its stored
    tensors stand for dense weights: G dense groups with each projection's dense_weight() give the same
    logits within 1e-4."""
    import mcsmoe_deploy as m
    from conftest import model_inputs

    reloaded = m.load_compressed(out)
    inputs = model_inputs("mixtral")
    with torch.no_grad():
        want, got = compressed.model.eval()(**inputs).logits, reloaded(**inputs).logits
    assert torch.equal(got, want)
    for layer in m.checkpoint.compressed_layers(reloaded):
        dense = {name: proj.dense_weight() for name, proj in layer.projections.items()}
        layer.projections = torch.nn.ModuleDict({
            name: m.GroupedLowRankExperts.from_dense(layer.layout, [
                {n: dense[n][g] for n in dense} for g in range(layer.num_groups)]).projections[name]
            for name in dense})
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, want, rtol=1e-4, atol=1e-5)


def exported_moe_functions(source, recipe, work, op_version: int, targets=("ort",)) -> list[onnx.FunctionProto]:
    """Compress `source` by `recipe` into work/c, export it to each of `targets` (validated: parity below 1e-4
    relative), check the op version imported; the first target's graph's MoE functions."""
    import mcsmoe_deploy as m
    from mcsmoe_deploy.contract import DOMAIN

    m.compress_model(source, work / "c", recipe, progress=False)
    functions = []
    for target in targets:
        report = m.export_model(work / "c", work / f"{target}.onnx", target=target)
        assert report.parity and all(check.max_rel_error < 1e-4 for check in report.parity), (target, report.parity)
        graph = onnx.load(str(work / f"{target}.onnx"), load_external_data=False)
        assert {i.domain: i.version for i in graph.opset_import}[DOMAIN] == op_version, target
        functions = functions or [f for f in graph.functions if f.domain == DOMAIN]
    return functions
