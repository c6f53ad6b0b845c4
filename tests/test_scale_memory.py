"""What keeps compress and export near one copy of a large model's weights (benchmarks/scale.py measures the
peaks) without changing a bit of what they write:

- merging reads each layer's experts as views in the dtype the model holds them (bf16 for a bf16 source)
  rather than fp32 copies: alignment and averaging read them in float64, so the merged experts are the
  same bit for bit (test_held_dtype checks whole checkpoints);
- export records the torch reference's logits from the model it is about to trace, in fp32, then casts
  it to the graph's dtype: the graph is the one an export without validation writes, byte for byte, and
  the parity is the one a separately loaded reference gives.
"""

from __future__ import annotations

import pytest
import torch

import mcsmoe_deploy as m
from hub_layout import save_hub_layout
from mcsmoe_deploy.compress.grouping import LayerGrouping
from mcsmoe_deploy.compress.merge import merge_layer
from mcsmoe_deploy.exporters.validate import check_parity
from mcsmoe_deploy.memory import release_freed_memory

CALIBRATION = dict(max_calib_tokens=512, calib_seq_len=32)


@pytest.fixture(scope="module")
def merged_bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    source = save_hub_layout("mixtral", root / "src", shards=2)
    out = root / "merged"
    m.compress_model(source, out, m.CompressionRecipe(experts=2, **CALIBRATION), progress=False)
    return source, out


@pytest.mark.parametrize("family", ("mixtral", "switch_transformers"))
def test_expert_views_merge_as_the_fp32_copies(family, tmp_path):
    source = save_hub_layout(family, tmp_path / "src", shards=1)
    model, adapter = m.load_model(source, device="cpu", dtype=torch.bfloat16)
    layer = adapter.moe_layers(model)[0]
    views, copies = adapter.read_experts(layer.block, copies=False), adapter.read_experts(layer.block)
    stored = {p.untyped_storage().data_ptr() for p in layer.block.experts.parameters()}
    for view, copy in zip(views, copies, strict=True):
        for name, tensor in view.items():
            assert tensor.untyped_storage().data_ptr() in stored  # no memory of its own
            assert copy[name].dtype == torch.float32 and torch.equal(tensor.float(), copy[name])
    experts = len(views)
    grouping = LayerGrouping([e % 3 for e in range(experts)], [0, 1, 2])
    frequency = torch.arange(1.0, experts + 1)
    layout = adapter.expert_layout(model.config)
    from_views = merge_layer(views, grouping, frequency, layout)
    from_copies = merge_layer(copies, grouping, frequency, layout)
    for a, b in zip(from_views, from_copies, strict=True):
        assert {t.dtype for t in a.values()} == {torch.float32}
        assert all(torch.equal(a[name], b[name]) for name in b)


def _graph_bytes(path) -> bytes:
    return path.read_bytes() + path.with_name(path.name + ".data").read_bytes()


@pytest.mark.parametrize("dtype", ("fp32", "fp16"))
def test_export_validation_recorded_before_tracing(dtype, merged_bf16, tmp_path):
    _, checkpoint = merged_bf16
    validated = m.export_model(checkpoint, tmp_path / "v.onnx", dtype=dtype, external_data=True)
    plain = m.export_model(checkpoint, tmp_path / "p.onnx", dtype=dtype, external_data=True, validate=False)
    assert plain.parity == [] and len(validated.parity) == 1
    # the graph does not depend on the reference having run first (nor, for fp16, on the fp32 detour)
    validated_bytes = _graph_bytes(tmp_path / "v.onnx").replace(b"v.onnx.data", b"p.onnx.data")
    assert validated_bytes == _graph_bytes(tmp_path / "p.onnx")
    reference = m.load_compressed(checkpoint).float()  # what validation loaded before: the checkpoint in fp32
    again = check_parity(tmp_path / "v.onnx", reference, with_past=True)
    assert (validated.parity[0].max_abs_error, validated.parity[0].max_rel_error) == (again.max_abs_error,
                                                                                      again.max_rel_error)
    assert validated.max_rel_error < (1e-2 if dtype == "fp16" else 1e-4)


def test_dense_export_validates_against_transformers_model(merged_bf16, tmp_path):
    source, _ = merged_bf16
    report = m.export_model(source, tmp_path / "d.onnx")
    reference, _ = m.load_model(source, device="cpu")
    again = check_parity(tmp_path / "d.onnx", reference, with_past=True)
    assert report.parity[0].max_abs_error == again.max_abs_error and report.max_rel_error < 1e-4


def test_release_freed_memory_trims_the_heap():
    assert release_freed_memory() is True  # Linux with glibc, as everywhere these tests run
