"""export_compressed_with_past: one prefill + decode graph with KV cache; greedy generation in onnxruntime.

Every decoder-only family, compressed (reference: load_compressed) and dense (reference:
transformers' own model; the exported copy goes through group_dense_experts).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import mcsmoe_deploy as m
from mcsmoe_deploy.exporters import DOMAIN, OP_TYPE
from mcsmoe_deploy.exporters.kv_export import (
    _PastWrapper,
    empty_past,
    export_compressed_with_past,
    greedy_generate_onnx,
)
from mcsmoe_deploy.contract import past_names, present_names
from mcsmoe_deploy.models import adapter_for_config

DECODER_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
RECIPE = dict(experts=3, rank_ratio=0.5, sparse_keep=0.1, max_calib_tokens=1024, calib_seq_len=32)


@pytest.fixture(scope="module", params=[(f, k) for f in DECODER_FAMILIES for k in ("compressed", "dense")],
                ids=lambda p: "-".join(p))
def exported(request, tiny_dirs, tmp_path_factory):
    family, kind = request.param
    root = tmp_path_factory.mktemp(f"kv_{family}_{kind}")
    if kind == "compressed":
        m.compress_model(tiny_dirs[family], root / "c", m.CompressionRecipe(**RECIPE), progress=False)
        model = m.load_compressed(root / "c")
        exported_model = model
    else:
        model, adapter = m.load_model(tiny_dirs[family], device="cpu")
        exported_model, _ = m.load_model(tiny_dirs[family], device="cpu")
        assert m.group_dense_experts(exported_model, adapter) == 2
    adapter = adapter_for_config(model.config.to_dict())
    path = root / "kv.onnx"
    export_compressed_with_past(exported_model, adapter, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model, adapter, path, session, kind


def _close(got, expected):
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_graph_structure(exported):
    model, adapter, path, _, kind = exported
    saved = onnx.load(path)
    onnx.checker.check_model(saved, full_check=True)
    num_layers, kv_heads, head_dim = adapter_for_config(model.config).kv_geometry(model.config)
    inputs = [i.name for i in saved.graph.input]
    assert inputs == ["input_ids", "attention_mask", "position_ids", *past_names(num_layers)]
    assert [o.name for o in saved.graph.output] == ["logits", *present_names(num_layers)]
    nodes = [n for n in saved.graph.node if (n.domain, n.op_type) == (DOMAIN, OP_TYPE)]
    # target ort writes dense float SwiGLU blocks as onnxruntime's MoE kernel, compressed ones as our op
    kernels = [n for n in saved.graph.node if (n.domain, n.op_type) == ("com.microsoft", "MoE")]
    assert (len(kernels), len(nodes)) == ((len(adapter.moe_layers(model)), 0) if kind == "dense"
                                           else (0, len(adapter.moe_layers(model))))
    assert {n.overload for n in nodes} <= {f.overload for f in saved.functions if f.domain == DOMAIN}
    past = saved.graph.input[3].type.tensor_type.shape.dim
    assert past[1].dim_value == kv_heads and past[3].dim_value == head_dim and past[2].dim_param


def test_prefill_and_decode_logits_match_torch(exported):
    model, _, _, session, _ = exported
    num_layers, kv_heads, head_dim = adapter_for_config(model.config).kv_geometry(model.config)
    ids = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.numpy()
    outputs = ["logits", *present_names(num_layers)]
    # prefill of 5 tokens, past length 0
    logits, *presents = session.run(outputs, {
        "input_ids": ids[:, :5].numpy(),
        "attention_mask": np.ones((1, 5), dtype=np.int64),
        "position_ids": np.arange(5, dtype=np.int64)[None],
        **empty_past(num_layers, kv_heads, head_dim),
    })
    _close(logits, full[:, :5])
    assert all(p.shape == (1, kv_heads, 5, head_dim) for p in presents)
    # decode the 6th token after a past of length 5
    logits, *presents = session.run(outputs, {
        "input_ids": ids[:, 5:].numpy(),
        "attention_mask": np.ones((1, 6), dtype=np.int64),
        "position_ids": np.array([[5]], dtype=np.int64),
        **dict(zip(past_names(num_layers), presents)),
    })
    _close(logits, full[:, 5:])
    assert all(p.shape == (1, kv_heads, 6, head_dim) for p in presents)


def test_steps_of_several_tokens_after_a_random_past_match_dynamic_cache(exported):
    """Three rows of 2 tokens after a random past of 4, each row against torch's batched step. The graph (target
    ort) runs them one row a step: onnxruntime's GroupQueryAttention refuses several tokens after a past for
    more than one row, and generation never asks for that."""
    model, _, _, session, _ = exported
    num_layers, kv_heads, head_dim = adapter_for_config(model.config).kv_geometry(model.config)
    generator = torch.Generator().manual_seed(7)
    batch, past_len, seq = 3, 4, 2
    ids = torch.randint(1, 256, (batch, seq), generator=generator)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq)[None].expand(batch, -1).contiguous()
    past = [torch.randn(batch, kv_heads, past_len, head_dim, generator=generator) for _ in range(2 * num_layers)]
    with torch.no_grad():
        expected = _PastWrapper(model)(ids, mask, positions, past)
    for row in range(batch):
        got = session.run(["logits", *present_names(num_layers)], {
            "input_ids": ids[row:row + 1].numpy(), "attention_mask": mask[row:row + 1].numpy(),
            "position_ids": positions[row:row + 1].numpy(),
            **{name: t[row:row + 1].numpy() for name, t in zip(past_names(num_layers), past)},
        })
        for g, e in zip(got, expected):
            _close(g, e[row:row + 1].numpy())


def test_greedy_generation_matches_torch(exported):
    model, _, _, session, _ = exported
    ids = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False
        )[0, 6:].tolist()
    got = greedy_generate_onnx(session, ids.numpy(), 16, *adapter_for_config(model.config).kv_geometry(model.config))
    assert got == ref
