"""`mcsmoe export` / `mcsmoe-export`: a validated ONNX file, or one clear line and nothing written."""

import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mcsmoe_deploy import CompressionRecipe, compress_model
from mcsmoe_deploy.cli import main, main_export
from mcsmoe_deploy.summary import format_export


@pytest.fixture(scope="module")
def compressed_dir(tiny_dirs, tmp_path_factory):
    recipe = CompressionRecipe(experts=3, rank_ratio=0.5, sparse_keep=0.1, max_calib_tokens=1024, calib_seq_len=32)
    out = tmp_path_factory.mktemp("export") / "compressed"
    compress_model(tiny_dirs["mixtral"], out, recipe, progress=False)
    return out


@pytest.fixture
def export_reports(returned_by):
    """The ExportReports of the CLI's export runs, in order (the CLI prints what these hold)."""
    import mcsmoe_deploy.exporters.pipeline as pipeline

    return returned_by(pipeline, "export_model")


def _relative_errors(report, printed: str) -> list[float]:
    """Each parity check's relative error, from the report the CLI printed (and checked to be printed)."""
    assert format_export(report) in printed
    return [check.max_rel_error for check in report.parity]


@pytest.mark.parametrize("extra", [["--no-past"], []], ids=["no-past", "with-past"])
def test_export_writes_a_validated_graph(extra, compressed_dir, tmp_path, capsys, export_reports):
    out = tmp_path / "model.onnx"
    assert main_export([str(compressed_dir), str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no staging leftovers
    assert "ai.mcsmoe::GroupedLowRankMoE x2" in printed
    assert ("KV-cache graph" in printed) == (not extra)
    errors = _relative_errors(export_reports[-1], printed)
    assert len(errors) == 1 and errors[0] < 1e-4
    inputs = [i.name for i in onnx.load(out, load_external_data=False).graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"] and ("past_key_values.0.key" in inputs) == (not extra)


def test_dense_export_with_inlined_copy_and_external_data(tiny_dirs, tmp_path, capsys, export_reports):
    out = tmp_path / "dense.onnx"
    assert main(["export", str(tiny_dirs["mixtral"]), str(out), "--target", "portable", "--inline",
                 "--external-data"]) == 0
    printed = capsys.readouterr().out
    inlined = tmp_path / "dense.inlined.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.inlined.onnx", "dense.onnx", "dense.onnx.data"]
    # the weights live once, in the data file both graphs refer to: no tensor over 1 KiB stays inline
    for path in (out, inlined):
        stored = onnx.load(path, load_external_data=False).graph.initializer
        assert max(len(t.raw_data) for t in stored) <= 1024
        assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in stored) >= 6  # gate/up/down x 2 layers
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "dense.onnx.data").stat().st_mode) == 0o666 & ~umask
    expert_bytes = 2 * 8 * 3 * 32 * 48 * 4  # layers x experts x projections x H x I x fp32
    assert (tmp_path / "dense.onnx.data").stat().st_size > expert_bytes
    errors = _relative_errors(export_reports[-1], printed)
    assert len(errors) == 2 and max(errors) < 1e-4, printed  # the graph and its inlined copy
    graph, flat = onnx.load(out), onnx.load(inlined)
    assert sum(n.domain == "ai.mcsmoe" for n in graph.graph.node) == 2 and len(graph.functions) >= 1
    assert not flat.functions and {n.domain for n in flat.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in flat.opset_import} <= {"", "ai.onnx"}
    # the two files compute the same thing
    feeds = {i.name: np.zeros([d.dim_value or 1 for d in i.type.tensor_type.shape.dim],
                              dtype=np.int64 if i.type.tensor_type.elem_type == onnx.TensorProto.INT64 else np.float32)
             for i in graph.graph.input}
    for name in feeds:
        if name.startswith("past_key_values"):
            feeds[name] = feeds[name][:, :, :0]
    feeds["input_ids"] = np.array([[5, 17, 99]], dtype=np.int64)
    feeds["attention_mask"] = np.ones((1, 3), dtype=np.int64)
    feeds["position_ids"] = np.arange(3, dtype=np.int64)[None]
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0] for p in (out, inlined)]
    np.testing.assert_allclose(run[0], run[1], rtol=1e-5, atol=1e-5 * np.abs(run[0]).max())


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("fused-compressed", ["--target", "ort-fused"], "is a compressed checkpoint"),
        ("switch", [], "exports two graphs (encoder.onnx, decoder.onnx) into a folder"),
        ("exists", ["--no-past"], "already exists"),
        ("no-parent", ["--no-past"], "parent folder of the output does not exist"),
        ("missing", ["--no-past"], "model directory not found"),
    ],
)
def test_export_refuses_with_one_line(case, extra, message, compressed_dir, tiny_dirs, tmp_path, capsys):
    model = {"switch": tiny_dirs["switch_transformers"], "missing": tmp_path / "nope"}.get(case, compressed_dir)
    out = tmp_path / ("absent" if case == "no-parent" else "") / "model.onnx"
    if case == "exists":
        out.write_text("keep me")
    assert main(["export", str(model), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mcsmoe: error:") and message in err[0]
    if case == "exists":
        assert out.read_text() == "keep me"
    else:
        assert not out.exists()


@pytest.mark.parametrize(("target", "side"), [("ort", "right"), ("portable", "left")])
def test_exported_graph_handles_padding_as_its_metadata_says_and_single_tokens(compressed_dir, tmp_path, target,
                                                                                 side):
    import numpy as np
    import onnxruntime as ort
    import torch

    from mcsmoe_deploy import export_model, load_compressed
    from mcsmoe_deploy.contract import PADDING_SIDE

    out = tmp_path / "model.onnx"
    export_model(compressed_dir, out, with_past=False, validate=False, target=target)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map.get(PADDING_SIDE, "left") == side
    model = load_compressed(compressed_dir)
    generator = torch.Generator().manual_seed(3)
    padded = torch.randint(1, 256, (2, 7), generator=generator)
    mask = torch.ones_like(padded)
    mask[0, -3:] = 0 if side == "right" else 1
    mask[0, :3] = 0 if side == "left" else 1
    single = torch.randint(1, 256, (3, 1), generator=generator)
    for ids, attention in [(padded, mask), (single, torch.ones_like(single))]:
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=attention).logits.numpy()
        (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": attention.numpy()})
        valid = attention.numpy().astype(bool)  # padded positions' logits are not defined
        assert np.abs(got[valid] - expected[valid]).max() < 1e-4 * np.abs(expected[valid]).max()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])  # renormalised and raw top-k routing
def test_ort_fused_target_maps_dense_blocks_to_onnxruntime_moe(family, tiny_dirs, tmp_path, capsys, export_reports):
    out = tmp_path / "fused.onnx"
    assert main(["export", str(tiny_dirs[family]), str(out), "--target", "ort-fused", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "com.microsoft::MoE x2" in printed and "GroupedLowRankMoE" not in printed
    errors = _relative_errors(export_reports[-1], printed)
    assert len(errors) == 1 and errors[0] < 1e-4
    graph = onnx.load(out)
    assert not graph.functions and "ai.mcsmoe" not in {o.domain for o in graph.opset_import}
    moe = [n for n in graph.graph.node if n.op_type == "MoE"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
    assert attrs["swiglu_fusion"] == 1 and attrs["k"] == 2


def test_switch_exports_an_encoder_and_a_decoder_folder(tiny_dirs, tmp_path, capsys, export_reports):
    out = tmp_path / "switch"
    assert main(["export", str(tiny_dirs["switch_transformers"]), str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    # the tokenizer comes along, so the folder is served on its own (`mcsmoe run OUT/`)
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["switch"]  # no staging folder left
    umask = os.umask(0)
    os.umask(umask)
    # staged privately, published as a plain create would be
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "decoder.onnx").stat().st_mode) == 0o666 & ~umask
    assert "ai.mcsmoe::GroupedLowRankMoE x4" in printed  # 2 encoder + 2 decoder MoE blocks
    errors = _relative_errors(export_reports[-1], printed)
    assert len(errors) == 1 and errors[0] < 1e-4


def test_streamed_single_file_is_the_message_onnx_would_write(tmp_path):
    from onnx import helper, numpy_helper

    from mcsmoe_deploy.exporters.onnx_file import stream_one_file

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (64, 32)), ("w2", (32, 16)), ("tiny", (2,)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"]),
         helper.make_node("Add", ["y0", "tiny_b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 16])],
        initializer=[*weights[:2], numpy_helper.from_array(np.ones(16, np.float32), "tiny_b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, tmp_path / "ref.onnx")
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=1024)
    referring = onnx.load(tmp_path / "ext.onnx", load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in referring.graph.initializer) == 2
    stream_one_file(referring, tmp_path, tmp_path / "streamed.onnx")
    streamed, reference = onnx.load(tmp_path / "streamed.onnx"), onnx.load(tmp_path / "ref.onnx")
    assert streamed == reference
    feeds = {"x": rng.standard_normal((3, 64)).astype(np.float32)}
    outputs = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
               for f in ("streamed.onnx", "ref.onnx")]
    np.testing.assert_array_equal(*outputs)
