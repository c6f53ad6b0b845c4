"""export_compressed: compressed decoder-only models -> one ONNX logits graph with GroupedLowRankMoE nodes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import mcsmoe_deploy as m
from mcsmoe_deploy.exporters import DOMAIN, OP_TYPE, export_compressed
from mcsmoe_deploy.exporters.custom_op import moe_blocks_as_custom_op
from mcsmoe_deploy.models import adapter_for_config

DECODER_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
RECIPE = dict(experts=3, rank_ratio=0.5, sparse_keep=0.1, max_calib_tokens=1024, calib_seq_len=32)


def _compressed(tiny_dirs, family, tmp_path):
    out = tmp_path / "c"
    m.compress_model(tiny_dirs[family], out, m.CompressionRecipe(**RECIPE), progress=False)
    model = m.load_compressed(out)
    return model, adapter_for_config(model.config.to_dict())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.numpy()


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_export_matches_torch(tiny_dirs, family, tmp_path):
    model, adapter = _compressed(tiny_dirs, family, tmp_path)
    path = tmp_path / "onnx" / "model.onnx"
    proto = export_compressed(model, adapter, path)
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    saved = onnx.load(path)
    onnx.checker.check_model(saved, full_check=True)
    assert [i.name for i in saved.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in saved.graph.output] == ["logits"]
    nodes = [n for n in saved.graph.node if (n.domain, n.op_type) == (DOMAIN, OP_TYPE)]
    assert len(nodes) == len(adapter.moe_layers(model))
    functions = {(f.domain, f.name, f.overload) for f in saved.functions}
    assert len(functions) == len(saved.functions)  # one function per distinct overload
    assert {n.overload for n in nodes} == {f[2] for f in functions if f[:2] == (DOMAIN, OP_TYPE)}
    norm = 1 if family == "mixtral" else int(bool(model.config.norm_topk_prob))
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"top_k": 2, "activation": b"silu", "gated": 1, "normalize_topk": norm}
        assert node.overload.startswith(f"gated_silu_k2_{'norm' if norm else 'raw'}_")
    assert saved.ir_version >= 10
    assert len(proto.graph.node) == len(saved.graph.node)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(3)
    for batch, seq in [(1, 5), (2, 9)]:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
        ref = _logits(model, ids)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_custom_op_eager_matches_reference_and_patch_is_undone(tiny_dirs, tmp_path):
    model, adapter = _compressed(tiny_dirs, "qwen2_moe", tmp_path)  # shared expert and raw routing
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    ref = _logits(model, ids)
    blocks = [layer.block for layer in adapter.moe_layers(model)]
    with moe_blocks_as_custom_op(model, adapter) as specs:
        assert len(specs) == len(blocks) and all("forward" in vars(b) for b in blocks)
        patched = _logits(model, ids)
    assert not any("forward" in vars(b) for b in blocks)
    assert np.abs(patched - ref).max() <= 1e-5 * np.abs(ref).max()
    np.testing.assert_array_equal(_logits(model, ids), ref)


def test_switch_not_implemented(tmp_path):
    adapter = next(a for a in m.models.families.ADAPTERS if a.family == "switch_transformers")
    with pytest.raises(NotImplementedError):
        export_compressed(torch.nn.Module(), adapter, tmp_path / "x.onnx")
