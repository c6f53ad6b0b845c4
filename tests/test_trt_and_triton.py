"""TensorRT backend (the parts that need no TensorRT) and the Triton repository writer."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from mcsmoe_deploy import UserError, export_model, open_session
from mcsmoe_deploy.contract import KVGeometry
from mcsmoe_deploy.runtime.triton import write_triton_repository
from mcsmoe_deploy.runtime.trt_session import (
    NOT_INSTALLED,
    DeviceInfo,
    choose_profile,
    decoder_profiles,
    engine_cache_key,
    engine_path,
    network_typing,
)

INPUTS = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{i}.{k}" for i in range(2)
                                                            for k in ("key", "value"))]
GEOMETRY = KVGeometry(num_layers=2, kv_heads=2, head_dim=8)  # the tiny models of conftest


@pytest.fixture(scope="module")
def graph(tiny_dirs, tmp_path_factory) -> Path:
    """The tiny Mixtral's portable KV-cache graph (functions not inlined)."""
    path = tmp_path_factory.mktemp("trt") / "mixtral.onnx"
    export_model(tiny_dirs["mixtral"], path, validate=False, target="portable")
    return path


@pytest.fixture(scope="module")
def external_graph(graph, tmp_path_factory) -> Path:
    """The same graph with its weights in an external data file `weights.bin`."""
    path = tmp_path_factory.mktemp("external") / "mixtral.onnx"
    onnx.save(onnx.load(str(graph)), str(path), save_as_external_data=True, location="weights.bin", size_threshold=1024)
    return path


def run_ort(path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def step_feeds(batch: int, past: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(1, 320, (batch, seq)), "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.tile(np.arange(past, past + seq), (batch, 1))}
    for name in INPUTS[3:]:
        feeds[name] = rng.standard_normal((batch, GEOMETRY.kv_heads, past, GEOMETRY.head_dim)).astype(np.float32)
    return feeds


# ---------------------------------------------------------------------------------------------
# profiles, cache key, precision


def test_profiles_cover_prefill_and_decode_for_the_geometry():
    general, decode = decoder_profiles(INPUTS, GEOMETRY, max_batch=4, max_seq=16, max_past=64)
    assert (general.name, decode.name) == ("general", "decode")
    assert set(general.shapes) == set(decode.shapes) == set(INPUTS)
    ids, mask, past = (general.shapes[n] for n in ("input_ids", "attention_mask", "past_key_values.1.value"))
    assert (ids.min, ids.opt, ids.max) == ((1, 1), (4, 8), (4, 16))  # opt: a prefill of half the longest prompt
    assert (mask.min, mask.opt, mask.max) == ((1, 1), (4, 8), (4, 80))  # cached + new tokens
    assert (past.min, past.opt, past.max) == ((1, 2, 0, 8), (4, 2, 0, 8), (4, 2, 64, 8))
    ids, mask, past = (decode.shapes[n] for n in ("position_ids", "attention_mask", "past_key_values.0.key"))
    assert (ids.min, ids.opt, ids.max) == ((1, 1), (4, 1), (4, 1))
    assert (mask.min, mask.opt, mask.max) == ((1, 1), (4, 33), (4, 65))  # opt: half the cache, the mean of a run
    assert (past.min, past.opt, past.max) == ((1, 2, 0, 8), (4, 2, 32, 8), (4, 2, 64, 8))


def shapes(batch: int, past: int, seq: int) -> dict[str, tuple[int, ...]]:
    kv = (batch, GEOMETRY.kv_heads, past, GEOMETRY.head_dim)
    return {"input_ids": (batch, seq), "position_ids": (batch, seq), "attention_mask": (batch, past + seq),
            **{name: kv for name in INPUTS[3:]}}


def test_steps_pick_the_decode_profile_for_one_token_and_refuse_shapes_past_the_limits():
    profiles = decoder_profiles(INPUTS, GEOMETRY, max_batch=4, max_seq=16, max_past=64)
    assert choose_profile(profiles, shapes(2, 0, 16)) == 0  # prefill
    assert choose_profile(profiles, shapes(4, 64, 1)) == 1  # decode, cache full
    assert choose_profile(profiles, shapes(1, 0, 1)) == 1  # a one-token prompt
    assert choose_profile(profiles, shapes(3, 20, 5)) == 0  # a chunk after a cached prefix
    for too_big in (shapes(5, 0, 1), shapes(1, 65, 1), shapes(1, 0, 17)):
        with pytest.raises(UserError, match="outside the engine's limits"):
            choose_profile(profiles, too_big)
    with pytest.raises(UserError, match="inputs a KV-cache decoder does not"):
        decoder_profiles([*INPUTS, "token_type_ids"], GEOMETRY, 4, 16, 64)
    with pytest.raises(UserError, match="max_batch >= 1"):
        decoder_profiles(INPUTS, GEOMETRY, 0, 16, 64)


def test_engine_cache_key_is_stable_and_changes_with_every_component(external_graph, tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(external_graph, model)
    shutil.copy(external_graph.parent / "weights.bin", tmp_path / "weights.bin")
    device = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0))
    profiles = decoder_profiles(INPUTS, GEOMETRY, 4, 16, 64)
    base = dict(onnx_path=model, tensorrt_version="10.13.0", device=device, precision="fp16", profiles=profiles,
                options={"plugin": False})
    key = engine_cache_key(**base)
    assert len(key) == 64 and engine_cache_key(**base) == key
    variants = {
        "tensorrt_version": "10.13.1",
        "device": DeviceInfo("NVIDIA H200", (9, 0)),
        "precision": "bf16",
        "profiles": decoder_profiles(INPUTS, GEOMETRY, 4, 16, 128),
        "options": {"plugin": True},
    }
    keys = {name: engine_cache_key(**{**base, name: value}) for name, value in variants.items()}
    keys["compute capability"] = engine_cache_key(**{**base, "device": DeviceInfo(device.name, (8, 0))})
    for file in (model, tmp_path / "weights.bin"):  # the graph, then its external data
        data = bytearray(file.read_bytes())
        data[-1] ^= 1
        file.write_bytes(bytes(data))
        keys[file.name] = engine_cache_key(**base)
    assert len(set(keys.values())) == len(keys) and key not in keys.values(), keys
    assert engine_path(tmp_path / "cache", model, key) == tmp_path / "cache" / f"m.{key[:24]}.plan"
    assert device.slug == "nvidia-h100-80gb-hbm3-sm90"


def test_network_typing_per_precision_and_tensorrt_generation():
    assert network_typing("fp32", "fp32", has_weak_typing=True) == (True, [])
    assert network_typing("fp16", "fp32", has_weak_typing=True) == (False, ["FP16"])
    assert network_typing("bf16", "fp32", has_weak_typing=True) == (False, ["BF16"])
    assert network_typing("fp16", "fp16", has_weak_typing=False) == (True, [])  # TensorRT 11: typed by the graph
    with pytest.raises(UserError, match="strongly typed networks only"):
        network_typing("fp16", "fp32", has_weak_typing=False)
    with pytest.raises(UserError, match="the graph is fp16"):
        network_typing("fp32", "fp16", has_weak_typing=True)
    with pytest.raises(UserError, match="unknown precision"):
        network_typing("int8", "fp32", has_weak_typing=True)


# ---------------------------------------------------------------------------------------------
# graph preparation


UNSUPPORTED_BY_THE_PARSER = {"Compress"}


def check_parser_friendly(path: Path) -> dict[str, int]:
    """Op counts of a prepared, inlined graph, after asserting it avoids what TensorRT's parser refuses."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    constants = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                              for o in n.output}
    assert not model.functions and {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.op_type not in UNSUPPORTED_BY_THE_PARSER
        assert not (node.op_type == "ScatterND" and attrs.get("reduction", b"none") != b"none"), node
        assert not (node.op_type == "NonZero" and types[node.input[0]] == onnx.TensorProto.BOOL), node
        assert not (node.op_type == "Split" and len(node.input) > 1 and node.input[1] not in constants), node
    return ops


@pytest.mark.parametrize("past,seq", [(0, 7), (5, 1), (5, 3)], ids=["prefill", "decode", "chunk"])
def test_prepared_graph_gives_the_same_logits_in_onnxruntime(graph, tmp_path, past, seq):
    from mcsmoe_deploy.runtime.trt_graph import prepare_for_tensorrt

    prepared = prepare_for_tensorrt(graph, tmp_path / "prepared.onnx")
    assert prepared.functions_inlined and not prepared.plugin
    # one of each per MoE block (two layers); the body gathers its tokens without Compress since version 3
    assert prepared.rewrites == {"ScatterND(reduction) -> ScatterElements": 2,
                                 "NonZero(bool) -> NonZero(float)": 2, "Split(runtime sizes) -> Gather": 2}
    ops = check_parser_friendly(prepared.path)
    assert ops["ScatterElements"] >= 2 and ops["Gather"] > 0
    feeds = step_feeds(batch=2, past=past, seq=seq)
    reference, result = run_ort(graph, feeds), run_ort(prepared.path, feeds)
    assert len(reference) == len(result) == 1 + 2 * GEOMETRY.num_layers
    for want, got in zip(reference, result):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(reference[0]).max() > 1  # logits of some size: the comparison means something


def test_plugin_preparation_tags_the_moe_nodes_and_keeps_the_functions(graph, tmp_path):
    from mcsmoe_deploy.runtime.trt_graph import prepare_for_tensorrt

    prepared = prepare_for_tensorrt(graph, tmp_path / "plugin.onnx", plugin=True)
    assert prepared.plugin and not prepared.functions_inlined
    assert prepared.rewrites == {"GroupedLowRankMoE -> plugin": 2}
    model = onnx.load(str(prepared.path))
    moe = [n for n in model.graph.node if n.op_type == "GroupedLowRankMoE"]
    assert len(moe) == 2 and all(n.domain == "ai.mcsmoe" for n in moe)
    for node in moe:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["plugin_namespace"], attrs["plugin_version"]) == (b"ai.mcsmoe", b"1")
    assert [f.name for f in model.functions] == ["GroupedLowRankMoE"]
    feeds = step_feeds(batch=1, past=3, seq=2, seed=4)  # still runs anywhere through the function
    np.testing.assert_allclose(run_ort(prepared.path, feeds)[0], run_ort(graph, feeds)[0], rtol=1e-5, atol=1e-5)


def test_preparation_reads_external_data(external_graph, tmp_path):
    from mcsmoe_deploy.runtime.trt_graph import graph_float_type, onnx_model_files, prepare_for_tensorrt

    assert onnx_model_files(external_graph) == [external_graph, external_graph.parent / "weights.bin"]
    assert graph_float_type(external_graph) == "fp32"
    prepared = prepare_for_tensorrt(external_graph, tmp_path / "prepared.onnx")
    feeds = step_feeds(batch=1, past=2, seq=4, seed=2)
    np.testing.assert_allclose(run_ort(prepared.path, feeds)[0], run_ort(external_graph, feeds)[0], rtol=1e-5,
                               atol=1e-5)


def test_preparation_is_a_list_of_passes_and_names_the_one_that_fails(external_graph, tmp_path):
    import shutil

    from mcsmoe_deploy.exporters.passes import GraphPassError
    from mcsmoe_deploy.runtime.trt_graph import preparation_passes, prepare_for_tensorrt

    assert [type(p).__name__ for p in preparation_passes(plugin=False)] == [
        "InlinePass", "RemoveUnusedFunctionsPass", "RemoveUnusedOpsetsPass", "ShapeInferencePass", "ParserRewritesPass"]
    assert [type(p).__name__ for p in preparation_passes(plugin=True)] == [
        "TagMoEForPluginPass", "ShapeInferencePass", "ParserRewritesPass"]
    alone = tmp_path / "alone.onnx"
    shutil.copy(external_graph, alone)  # the graph without its weights.bin
    with pytest.raises(GraphPassError, match=r"^graph pass ParserRewritesPass failed: .*weights\.bin.*does not exist"):
        prepare_for_tensorrt(alone, tmp_path / "prepared.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.onnx"]


# ---------------------------------------------------------------------------------------------
# without TensorRT


def test_importing_the_package_imports_no_tensorrt():
    code = ("import sys, mcsmoe_deploy, mcsmoe_deploy.runtime.trt_session, mcsmoe_deploy.runtime.triton; "
            "print(sorted(m for m in ('tensorrt', 'onnx_graphsurgeon', 'tritonclient') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_trt_backend_without_tensorrt_is_one_clear_user_error(graph, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, even where it is
    with pytest.raises(UserError) as error:
        open_session(graph, "trt")
    assert str(error.value) == NOT_INSTALLED


def test_run_on_trt_without_tensorrt_says_so_in_one_line(graph, monkeypatch, capsys):
    """What the user sees: how to get TensorRT, that the backend is unverified, no traceback, exit 2."""
    from mcsmoe_deploy.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["run", str(graph), "--backend", "trt", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err and not captured.out.strip()
    assert "TensorRT is not installed" in lines[0] and "pip install tensorrt" in lines[0] and "unverified" in lines[0]


# ---------------------------------------------------------------------------------------------
# Triton


@functools.cache
def model_config_class():
    """Triton's ModelConfig protobuf message, from tritonclient."""
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient without its grpc extra: load the generated module alone
        spec = importlib.util.find_spec("tritonclient")
        if spec is None:
            pytest.skip("tritonclient is not installed (pip install 'tritonclient[grpc]')")
        source = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
        module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", source)
        model_config_pb2 = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(model_config_pb2)
    return model_config_pb2


def parse_config(path: Path):
    from google.protobuf import text_format

    pb2 = model_config_class()
    return pb2, text_format.Parse(path.read_text(), pb2.ModelConfig())


def test_triton_repository_parses_as_model_config_with_the_graph_io(external_graph, tmp_path):
    repo = write_triton_repository(external_graph, tmp_path / "repo", name="tiny_moe", max_batch_size=4)
    assert repo.model_dir == tmp_path / "repo" / "tiny_moe" and "'tiny_moe' (onnxruntime" in repo.summary()
    assert sorted(p.relative_to(repo.model_dir).as_posix() for p in repo.model_dir.rglob("*") if p.is_file()) == [
        "1/model.onnx", "1/weights.bin", "config.pbtxt"]
    pb2, config = parse_config(repo.model_dir / "config.pbtxt")
    assert (config.name, config.backend, config.max_batch_size) == ("tiny_moe", "onnxruntime", 4)
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 100
    io = {t.name: (pb2.DataType.Name(t.data_type), list(t.dims)) for t in [*config.input, *config.output]}
    kv = ("TYPE_FP32", [GEOMETRY.kv_heads, -1, GEOMETRY.head_dim])
    assert io == {
        "input_ids": ("TYPE_INT64", [-1]), "attention_mask": ("TYPE_INT64", [-1]), "position_ids": ("TYPE_INT64", [-1]),
        **{name: kv for name in INPUTS[3:]},
        "logits": ("TYPE_FP32", [-1, 320]),
        **{f"present.{i}.{k}": kv for i in range(2) for k in ("key", "value")},
    }
    assert [t.name for t in config.input] == INPUTS  # the graph's order
    # the copied graph finds its weights in the version folder
    feeds = step_feeds(batch=1, past=2, seq=1, seed=3)
    np.testing.assert_array_equal(run_ort(repo.model_dir / "1" / "model.onnx", feeds)[0],
                                  run_ort(external_graph, feeds)[0])


def test_triton_repository_refuses_to_overwrite_without_force(graph, tmp_path):
    write_triton_repository(graph, tmp_path, name="m")
    (tmp_path / "m" / "stale.txt").write_text("from an earlier run")
    with pytest.raises(UserError, match=r"already exists \(use --force to replace it\)"):
        write_triton_repository(graph, tmp_path, name="m")
    assert (tmp_path / "m" / "stale.txt").exists()  # untouched
    write_triton_repository(graph, tmp_path, name="m", max_batch_size=0, force=True)
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left behind
    pb2, config = parse_config(tmp_path / "m" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [-1, -1] and list(config.input[3].dims) == [-1, 2, -1, 8]  # batch axis kept


def test_triton_tensorrt_repository_serves_the_engine(graph, tmp_path):
    with pytest.raises(UserError, match="pass engine_path"):
        write_triton_repository(graph, tmp_path, backend="tensorrt")
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not really an engine")
    repo = write_triton_repository(graph, tmp_path / "repo", backend="tensorrt", engine_path=engine)
    assert (repo.model_dir / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert not (repo.model_dir / "1" / "model.onnx").exists()
    pb2, config = parse_config(repo.model_dir / "config.pbtxt")
    assert (config.name, config.backend) == ("mixtral", "tensorrt")
    assert [pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_GPU"]
    assert len(config.input) == 7 and len(config.output) == 5
    for bad, message in [({"backend": "tflite"}, "unknown Triton backend"), ({"name": "a/b"}, "model name"),
                         ({"max_batch_size": -1}, "max_batch_size must be >= 0")]:
        with pytest.raises(UserError, match=message):
            write_triton_repository(graph, tmp_path / "other", **bad)


def test_triton_command(graph, tmp_path, capsys):
    from mcsmoe_deploy.cli import main

    assert main(["triton", str(graph), str(tmp_path / "repo"), "--name", "moe", "--max-batch-size", "2"]) == 0
    assert "wrote Triton model 'moe' (onnxruntime, max_batch_size 2" in capsys.readouterr().out
    assert parse_config(tmp_path / "repo" / "moe" / "config.pbtxt")[1].max_batch_size == 2
    assert main(["triton", str(graph), str(tmp_path / "repo"), "--name", "moe"]) == 2
    assert capsys.readouterr().err.strip().endswith("already exists (use --force to replace it)")


@pytest.mark.parametrize("axis", [0, None], ids=["rows", "flattened"])
def test_compress_becomes_gather_of_nonzero(tmp_path, axis):
    # no exported body uses Compress any more; graphs from elsewhere (and older exports) still may
    from mcsmoe_deploy.runtime.trt_graph import prepare_for_tensorrt

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, 3])
    keep = onnx.helper.make_tensor_value_info("keep", onnx.TensorProto.BOOL, [5])
    out = onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)
    node = onnx.helper.make_node("Compress", ["x", "keep"], ["out"], **({} if axis is None else {"axis": axis}))
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x, keep], [out]),
                                   opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "compress.onnx")
    prepared = prepare_for_tensorrt(tmp_path / "compress.onnx", tmp_path / "prepared.onnx")
    assert prepared.rewrites == {"Compress -> Gather(NonZero)": 1}
    assert "Compress" not in check_parser_friendly(prepared.path)
    feeds = {"x": np.arange(15, dtype=np.float32).reshape(5, 3), "keep": np.array([1, 0, 1, 1, 0], dtype=bool)}
    (want,), (got,) = run_ort(tmp_path / "compress.onnx", feeds), run_ort(prepared.path, feeds)
    np.testing.assert_array_equal(got, want)
