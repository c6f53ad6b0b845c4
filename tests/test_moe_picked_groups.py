"""Bodies that run only the picked groups (exporters/moe_body_picked.py): parity with the torch reference in
both input layouts (stacked version 1, per-group version 3) at token counts on both sides of the If, groups
without tokens, removed experts; which blocks ship picked_groups; fewer nodes run per decode step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mcsmoe_deploy.exporters import MoEOpSpec, standalone_model
from mcsmoe_deploy.exporters.moe_body import build_body
from mcsmoe_deploy.exporters.moe_body_picked import SMALL_GROUP_VALUES, body_strategy, group_values, picks_groups
from tests.test_moe_op import GATED_DENSE, GATED_LOWRANK_SPARSE, PLAIN_MIXED, _experts, _feeds, _inputs, _route

STRATEGIES = ("gather_groups", "picked_groups")


def _model(spec: MoEOpSpec, strategy: str) -> onnx.ModelProto:
    model = standalone_model(spec)
    del model.functions[0].node[:]
    model.functions[0].node.extend(build_body(spec, strategy))
    return model


def _per_group_feeds(spec: MoEOpSpec, feeds: dict) -> dict:
    """Stacked [G, out, in] factors -> version 3's `{proj}_{factor}_{g}` [in, out]."""
    split = {k: v for k, v in feeds.items() if k in spec.input_names()}
    for name, proj in spec.projections:
        for factor in proj.factors:
            split.update({f"{name}_{factor}_{g}": np.ascontiguousarray(feeds[f"{name}_{factor}"][g].T)
                          for g in range(spec.num_groups)})
    return split


def _check(module, top_k: int, routing: str, hidden, logits, strategy: str, per_group: bool) -> np.ndarray:
    spec = MoEOpSpec.from_experts(module, top_k, routing)
    feeds = _feeds(module, spec, hidden, logits)
    if per_group:
        spec = dataclasses.replace(spec, per_group=True)
        feeds = _per_group_feeds(spec, feeds)
    model = _model(spec, strategy)
    onnx.checker.check_model(model, full_check=True)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    index, weights = _route(logits, top_k, spec.normalize_topk)
    with torch.no_grad():
        reference = module(hidden, index, weights).numpy()
    assert got.shape == reference.shape
    if reference.size:
        assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()
    return got


@pytest.mark.parametrize("per_group", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tokens", [0, 1, 2, 3, 5, 17])  # G = 4 or 8, k = 2: the If turns at T k >= G
def test_matches_reference(strategy, per_group, tokens):
    """Low rank + sparse rows (repeated rows), merged groups; plain experts with removed ones; Mixtral's dense."""
    merged = _experts(True, "silu", [0, 0, 1, 2, 3, 1], GATED_LOWRANK_SPARSE, seed=21)
    hidden, logits = _inputs(tokens, 6, seed=22)
    if tokens:
        logits[0, :2] = torch.tensor([5.0, 4.5])  # token 0 picks experts 0 and 1, both in group 0
    _check(merged, 2, "softmax_topk_norm", hidden, logits, strategy, per_group)
    removed = _experts(False, "gelu", [0, -1, 1, 2, 1, -1], PLAIN_MIXED, seed=23)
    if tokens:
        logits[0, 1] = 8.0  # token 0's first pick is removed
    _check(removed, 2, "softmax_topk", hidden, logits, strategy, per_group)
    dense = _experts(True, "silu", list(range(8)), GATED_DENSE, seed=24)
    hidden, logits = _inputs(tokens, 8, seed=25)
    _check(dense, 2, "softmax_topk_norm", hidden, logits, strategy, per_group)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tokens", [1, 9])
def test_groups_without_tokens(strategy, tokens):
    """Routing that reaches two of four groups, one group no expert maps to; and a token whose two picks
    share a group while another group gets one token (padding rows must add nothing)."""
    module = _experts(True, "silu", [0, 0, 3, 3, 1, 1, 3, -1], GATED_LOWRANK_SPARSE, seed=26)
    hidden, logits = _inputs(tokens, 8, seed=27)
    logits[:, 4:] -= 20.0  # only experts 0..3: groups 0 and 3
    logits[0, :2] = torch.tensor([9.0, 8.0])  # token 0: both picks in group 0
    index, _ = _route(logits, 2, True)
    assert set(module.expert_to_group[index].flatten().tolist()) <= {0, 3}
    for per_group in (False, True):
        _check(module, 2, "softmax_topk_norm", hidden, logits, strategy, per_group)


def test_which_blocks_ship_picked_groups():
    dense = MoEOpSpec.from_experts(_experts(True, "silu", list(range(8)), GATED_DENSE), 2, "softmax_topk_norm")
    split = dataclasses.replace(dense, per_group=True)
    assert group_values(dense) == 3 * 16 * 24
    assert not picks_groups(dense) and body_strategy(dense) == "gather_tokens"  # stacked (portable): unchanged
    assert picks_groups(split) and body_strategy(split) == "picked_groups"
    assert {n.op_type for n in standalone_model(split).functions[0].node} >= {"If"}
    # groups over the limit (the 330 MB model's) keep gather_tokens: no copy of their factors per call
    big = dataclasses.replace(split, hidden_size=512, intermediate_size=1024, projections=tuple(
        (name, dataclasses.replace(p, out_features=p.out_features * 512 // 16 if name == "down" else 1024,
                                   in_features=1024 if name == "down" else 512)) for name, p in split.projections))
    assert group_values(big) > SMALL_GROUP_VALUES and body_strategy(big) == "gather_tokens"


def _ops_run(tmp_path: Path, strategy: str, tokens: int) -> list[str]:
    """Op types onnxruntime runs for one call of a gated dense G = 8, top-2 node (weights as initializers)."""
    module = _experts(True, "silu", list(range(8)), GATED_DENSE)
    stacked = MoEOpSpec.from_experts(module, 2, "softmax_topk_norm")
    spec = dataclasses.replace(stacked, per_group=True)
    hidden, logits = _inputs(tokens, 8)
    feeds = _per_group_feeds(spec, _feeds(module, stacked, hidden, logits))
    model = _model(spec, strategy)
    del model.graph.input[2:]
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in feeds.items()
                                   if k not in ("hidden", "router_logits"))
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / f"{strategy}-{tokens}")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"hidden": feeds["hidden"], "router_logits": feeds["router_logits"]})
    trace = json.loads(Path(session.end_profiling()).read_text())
    return [e["args"].get("op_name") for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def test_decode_runs_fewer_nodes_than_gather_tokens(tmp_path):
    """One token, G = 8: gather_tokens runs 5 nodes for each of the 8 groups; picked_groups none for the 6
    idle ones. Counted as onnxruntime runs them (optimizer on)."""
    gather_tokens = _ops_run(tmp_path, "gather_tokens", 1)
    picked = [op for op in _ops_run(tmp_path, "picked_groups", 1) if op != "If"]
    assert len(picked) <= len(gather_tokens) - 20, (picked, gather_tokens)


def test_if_turns_at_as_many_picks_as_groups(tmp_path):
    """G = 8, k = 2: 3 tokens (6 picks) take gather_groups, 4 tokens (8 picks) gather_tokens (its ScatterND)."""
    assert "ScatterND" not in _ops_run(tmp_path, "picked_groups", 3)
    assert "ScatterND" in _ops_run(tmp_path, "picked_groups", 4)
