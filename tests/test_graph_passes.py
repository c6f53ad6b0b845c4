"""exporters/passes: the pass manager, declared requirements, onnx-ir inlining, ExportConfig, passes during export."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from mcsmoe_deploy import ExportConfig, UserError, export_model
from mcsmoe_deploy.exporters import TARGETS, MoEOpSpec, standalone_model
from mcsmoe_deploy.exporters.passes import GraphPassError, GraphPassManager
from mcsmoe_deploy.exporters.passes.inline import inline_passes
from mcsmoe_deploy.exporters.passes.metadata import SetMetadataPass
from mcsmoe_deploy.exporters.passes.ort_moe import FuseMoEForOrtPass, ORT_DOMAIN
from mcsmoe_deploy.grouped_experts import ProjectionSpec
from mcsmoe_deploy.models import ExpertLayout

E, H, I = 4, 16, 24  # experts, hidden, intermediate


def _spec(rank: int | None = None, sparse_rows: int = 0) -> MoEOpSpec:
    return MoEOpSpec(
        num_experts=E, num_groups=E, hidden_size=H, intermediate_size=I, top_k=2, gated=True, activation="silu",
        routing="softmax_topk_norm",
        projections=tuple((name, ProjectionSpec(*shape, rank, sparse_rows))
                          for name, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I)))),
    )


def _dense_model_with_weights() -> onnx.ModelProto:
    """One dense GroupedLowRankMoE node whose grouping and weights are initializers (G = E, identity)."""
    spec = _spec()
    model = standalone_model(spec)
    rng = np.random.default_rng(0)
    tensors = [numpy_helper.from_array(np.arange(E, dtype=np.int64), "expert_to_group")]
    tensors += [numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)
                for name, shape in spec.input_shapes().items() if name.endswith("_weight")]
    model.graph.initializer.extend(tensors)
    kept = [v for v in model.graph.input if v.name in ("hidden", "router_logits")]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def _feeds(model: onnx.ModelProto, tokens: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value or tokens for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feeds[value.name] = (np.arange(E) if value.name == "expert_to_group"
                                 else rng.integers(0, min(shape[-1], I), size=shape)).astype(np.int64)
        else:
            feeds[value.name] = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


class _Touch(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.doc_string = "touched"
        return ir.passes.PassResult(model, modified=True)


class _Idle(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=False)


class _Broken(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise ValueError("no luck")


class _Unmet(ir.passes.InPlacePass):
    def requires(self, model: ir.Model) -> None:
        raise KeyError("needs a thing")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise AssertionError("must not run when its precondition fails")


def test_manager_reports_modifying_passes_and_names_the_failing_one():
    model = ir.from_proto(_dense_model_with_weights())
    applied = GraphPassManager([_Idle(), _Touch(), _Idle()])(model)
    assert applied.ran == ["_Idle", "_Touch", "_Idle"] and applied.modified_by == ["_Touch"] and applied.modified
    assert applied.model is model and model.doc_string == "touched"
    assert not GraphPassManager([_Idle()])(model).modified

    with pytest.raises(GraphPassError, match=r"^graph pass _Broken failed: no luck$") as error:
        GraphPassManager([_Touch(), _Broken(), _Idle()])(model)
    assert error.value.pass_name == "_Broken" and isinstance(error.value.__cause__, ValueError)
    with pytest.raises(GraphPassError, match=r"^graph pass _Unmet failed: 'needs a thing'$") as error:
        GraphPassManager([_Unmet()])(model)
    assert error.value.pass_name == "_Unmet"


def test_fusion_requires_readable_weights_and_reads_them_lazily(tmp_path):
    proto = _dense_model_with_weights()
    expected = _run(proto, feeds := _feeds(proto))
    onnx.save_model(proto, tmp_path / "moe.onnx", save_as_external_data=True, location="moe.onnx.data",
                    size_threshold=1024)
    on_disk = onnx.load(tmp_path / "moe.onnx", load_external_data=False)

    unresolved = ir.from_proto(on_disk)  # external tensors relative to the working directory: not there
    with pytest.raises(GraphPassError, match=r"graph pass FuseMoEForOrtPass failed: .*'gate_weight'.*does not exist"):
        GraphPassManager([FuseMoEForOrtPass()])(unresolved)

    model = ir.from_proto(on_disk)
    ir.external_data.set_base_dir(model.graph, tmp_path)
    applied = GraphPassManager([FuseMoEForOrtPass()])(model)
    assert applied.modified_by == ["FuseMoEForOrtPass"]
    weights = {name: value.const_value for name, value in model.graph.initializers.items()}
    # the new fc1 is in memory; the weight the pass only re-wires stays a reference to the file
    assert isinstance(weights["down_weight"], ir.ExternalTensor)
    assert not isinstance(weights["gate_weight.swiglu_fc1"], ir.ExternalTensor)
    assert [node.domain for node in model.graph] == [ORT_DOMAIN]
    ir.external_data.load_to_model(model)
    np.testing.assert_allclose(_run(ir.to_proto(model), feeds), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [_spec(), _spec(rank=4, sparse_rows=3)], ids=["dense", "lowrank-sparse"])
def test_inline_passes_match_onnx_inliner(spec):
    model = standalone_model(spec)
    reference = onnx.inliner.inline_local_functions(model)
    applied = GraphPassManager(inline_passes())(ir.from_proto(model))
    inlined = ir.to_proto(applied.model)

    assert applied.modified_by == ["InlinePass", "RemoveUnusedOpsetsPass"]
    assert not inlined.functions and {n.domain for n in inlined.graph.node} == {""}
    assert {o.domain for o in inlined.opset_import} == {""}  # onnx.inliner leaves ai.mcsmoe imported
    assert Counter(n.op_type for n in inlined.graph.node) == Counter(n.op_type for n in reference.graph.node)
    onnx.checker.check_model(inlined, full_check=True)
    feeds = _feeds(model)
    np.testing.assert_array_equal(_run(inlined, feeds), _run(reference, feeds))
    assert np.abs(_run(model, feeds)).max() > 0.1


def test_metadata_pass_reports_a_change_only_when_it_makes_one():
    model = ir.from_proto(_dense_model_with_weights())
    set_source = SetMetadataPass({"mcsmoe.target": "mcsmoe"})
    assert set_source(model).modified and model.metadata_props["mcsmoe.target"] == "mcsmoe"
    assert not set_source(model).modified


def test_export_config_validates_in_its_own_terms():
    with pytest.raises(UserError, match=r"^unknown export target 'tensorrt'; one of ort, portable, mcsmoe, ort-fused, ort-qmoe$"):
        ExportConfig(target="tensorrt")
    with pytest.raises(UserError, match=r"^opset 17 is too old: the op's function body needs opset >= 18$"):
        ExportConfig(opset=17)
    fused = ExportConfig(target="ort-fused")
    with pytest.raises(UserError) as error:
        fused.check_checkpoint("ckpt", "mixtral", encoder_decoder=False, compressed=True)
    assert str(error.value) == ("target 'ort-fused' maps dense experts to com.microsoft.MoE; ckpt is a compressed "
                                "checkpoint (export it with target 'ort' or 'portable')")
    with pytest.raises(UserError, match=r"needs a dense checkpoint with SwiGLU experts; switch_transformers "
                                        r"experts are plain relu$"):
        fused.check_experts("switch_transformers", ExpertLayout(False, "relu", 8, 16))
    with pytest.raises(UserError, match=r"without KV cache \(with_past=False\) is for decoder-only models$"):
        ExportConfig(with_past=False).check_checkpoint("ckpt", "switch_transformers", True, False)
    fused.check_checkpoint("ckpt", "mixtral", encoder_decoder=False, compressed=False)
    fused.check_experts("mixtral", ExpertLayout(True, "silu", 8, 16))
    names = [type(p).__name__ for p in ExportConfig(target="ort-fused", passes=[_Idle()]).graph_passes()]
    assert names == ["StripTraceMetadataPass", "FuseMoEForOrtPass", "RemoveUnusedNodesPass", "RemoveUnusedFunctionsPass",
                     "RemoveUnusedOpsetsPass", "_Idle"]
    # target ort: dense float32 SwiGLU blocks to MoE, dense int4 ones to QMoE (the rest left as they are),
    # both fed 3-D activations, before MatMulNBits
    assert [type(p).__name__ for p in ExportConfig().graph_passes()] == [
        "StripTraceMetadataPass", "FuseMoEForOrtPass", "FuseQMoEPass", "RemoveUnusedNodesPass",
        "RemoveUnusedFunctionsPass", "RemoveUnusedOpsetsPass", "SkipMoEReshapesPass", "PackedQKVPass",
        "SkipNormFusionPass", "MatMulNBitsPass", "FuseSiblingMatMulNBitsPass"]
    assert [type(p).__name__ for p in ExportConfig(target="portable").graph_passes()] == ["StripTraceMetadataPass"]
    # the former name of the portable target is accepted and recorded under the new one
    assert ExportConfig(target="mcsmoe").target == "portable" and not ExportConfig(target="mcsmoe").fuses_ort
    assert ExportConfig().target == "ort" and ExportConfig().fuses_ort


def test_export_model_takes_a_config_or_its_fields_not_both(tmp_path):
    with pytest.raises(TypeError, match="not both"):
        export_model(tmp_path / "absent", tmp_path / "x.onnx", ExportConfig(), validate=False)
    with pytest.raises(UserError, match="unknown export target 'trt'"):
        export_model(tmp_path / "absent", tmp_path / "x.onnx", target="trt")


def test_cli_target_choices_are_the_library_targets():
    from mcsmoe_deploy.cli import build_parser

    export = build_parser()._subparsers._group_actions[0].choices["export"]
    target = next(a for a in export._actions if a.dest == "target")
    assert tuple(target.choices) == TARGETS and target.default == ExportConfig().target


class _WeightsOnDisk(ir.passes.InPlacePass):
    """Records, for every initializer over 1 KiB, whether its bytes are still on disk when the pass runs."""

    seen: dict[str, bool] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for name, value in model.graph.initializers.items():
            if value.const_value is not None and value.const_value.nbytes > 1024:
                type(self).seen[name] = isinstance(value.const_value, ir.ExternalTensor)
        return ir.passes.PassResult(model, modified=False)


def test_export_runs_passes_on_a_graph_whose_weights_stay_on_disk(tiny_dirs, tmp_path):
    _WeightsOnDisk.seen = {}
    out = tmp_path / "model.onnx"
    export_model(tiny_dirs["mixtral"], out, ExportConfig(target="mcsmoe", with_past=False, validate=False,
                                                         passes=(_WeightsOnDisk(),)))
    assert len(_WeightsOnDisk.seen) >= 6 and all(_WeightsOnDisk.seen.values())  # gate/up/down x 2 layers at least
    metadata = {p.key: p.value for p in onnx.load(out, load_external_data=False).metadata_props}
    assert metadata["mcsmoe.target"] == "portable"

    with pytest.raises(GraphPassError, match="graph pass _Broken failed: no luck"):
        export_model(tiny_dirs["mixtral"], tmp_path / "broken.onnx",
                     ExportConfig(with_past=False, validate=False, passes=(_Broken(),)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # nothing half-written


def test_ort_fused_with_external_data_stores_each_weight_once(tiny_dirs, tmp_path):
    out = tmp_path / "fused.onnx"
    report = export_model(tiny_dirs["mixtral"], out, target="ort-fused", external_data=True, with_past=False)
    assert max(p.max_rel_error for p in report.parity) < 1e-4
    graph = onnx.load(out, load_external_data=False)
    assert {n.op_type for n in graph.graph.node if n.domain == ORT_DOMAIN} == {"MoE"}
    lengths = [int(dict((e.key, e.value) for e in t.external_data)["length"])
               for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    # the replaced gate, up and grouping tensors left no bytes behind in the data file
    assert (tmp_path / "fused.onnx.data").stat().st_size == sum(lengths)
    fc1 = [t for t in graph.graph.initializer if t.name.endswith(".swiglu_fc1")]
    assert len(fc1) == 2 and all(t.data_location == onnx.TensorProto.EXTERNAL for t in fc1)
