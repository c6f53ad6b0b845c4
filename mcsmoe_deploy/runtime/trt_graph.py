"""Preparing an exported graph for TensorRT's ONNX parser (needs no TensorRT; checked in onnxruntime).

`prepare_for_tensorrt` writes a copy of a graph from `mcsmoe export` that computes the same
logits with what the parser supports (onnx-tensorrt's operator table for TensorRT 10):

- GroupedLowRankMoE nodes: with a plugin, they get the attribute `plugin_namespace =
  "ai.mcsmoe"` (the parser looks plugins up by op type, `plugin_version` and that
  attribute, not by the node's domain; the attribute also makes the plugin win over the
  local function). Without one, the local functions are inlined (onnx-ir's InlinePass) into
  standard ops, which constant folding can then reach.
- rewrites inside the MoE bodies: `Compress` (unsupported) -> `Gather` at `NonZero`;
  `ScatterND` with a reduction (unsupported) -> `ScatterElements` with that reduction
  (served by TensorRT's ScatterElements plugin); `NonZero` of a bool tensor -> of a float
  cast (NonZero lists float types only); `Split` with sizes computed at run time ->
  `Gather` of each part's rows (TensorRT 10.0 split such tensors evenly:
  NVIDIA/TensorRT#3892).
- onnx-graphsurgeon: constant folding (through onnxruntime) before the rewrites, then cleanup and
  topological sort.

Each step is an onnx-ir pass (exporters/passes: inline, tensorrt; `preparation_passes`).
Shape inference runs on the graph without its weights (so models past protobuf's 2 GB work);
the weights are loaded afterwards for folding, and written as external data when large.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import TensorProto
from onnx_ir.passes.common import ShapeInferencePass

from ..contract import DOMAIN as OP_DOMAIN
from ..contract import OP_TYPE, PAST_PREFIX, external_data_files, read_graph
from ..exporters.passes import GraphPassManager
from ..exporters.passes.inline import inline_passes
from ..errors import UserError
from ..exporters.passes.requirements import moe_nodes, onnxruntime_only_ops
from ..exporters.passes.tensorrt import FOLD_SIZE_LIMIT, ParserRewritesPass, TagMoEForPluginPass

FLOAT_TYPES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}


@dataclass
class PreparedGraph:
    """What `prepare_for_tensorrt` wrote and changed."""

    path: Path
    plugin: bool
    functions_inlined: bool
    nodes_before: int
    nodes_after: int
    rewrites: dict[str, int] = field(default_factory=dict)  # rewrite -> nodes rewritten


def onnx_model_files(path: str | Path) -> list[Path]:
    """The graph file and every external data file it refers to (sorted, each once; each checked to lie
    inside the graph's folder: `contract.external_data_files`)."""
    path = Path(path)
    return [path, *external_data_files(read_graph(path), path.parent)]


def graph_float_type(path: str | Path) -> str:
    """"fp32" | "fp16" | "bf16": the element type of the graph's KV-cache inputs (else its first float input)."""
    inputs = onnx.load(str(path), load_external_data=False).graph.input
    floats = [i for i in inputs if i.type.tensor_type.elem_type in FLOAT_TYPES]
    pasts = [i for i in floats if i.name.startswith(PAST_PREFIX)]
    return FLOAT_TYPES[(pasts or floats)[0].type.tensor_type.elem_type] if floats else "fp32"


def _save(model: onnx.ModelProto, out_path: Path, check: bool) -> None:
    """Write `model`, weights in `OUT.data` when large. check: onnx.checker full_check; not for a
    plugin graph, whose MoE nodes carry TensorRT's attributes beyond the op's ONNX schema."""
    from ..contract import external_data_path
    from ..exporters.onnx_file import EXTERNAL_DATA_THRESHOLD, save_checked

    if check:
        save_checked(model, out_path)
        return
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(model, str(out_path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=external_data_path(out_path).name, size_threshold=1024)


def preparation_passes(plugin: bool, fold_constants: bool = True) -> list[ir.passes.PassBase]:
    """The passes of `prepare_for_tensorrt`, in order: plugin tagging or inlining, shape inference, rewrites."""
    # the onnx defaults (not strict, no data propagation): a node it cannot type stays untyped, not an error
    infer = ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)
    first = [TagMoEForPluginPass()] if plugin else inline_passes()
    return [*first, infer, ParserRewritesPass(fold_constants)]


def prepare_for_tensorrt(src: str | Path, out_path: str | Path, plugin: bool = False,
                         fold_constants: bool = True) -> PreparedGraph:
    """Write `src` (an ONNX file from `mcsmoe export`) prepared for TensorRT's parser to
    `out_path` (see the module docstring). plugin: route the MoE nodes to a registered
    GroupedLowRankMoE plugin instead of inlining their functions."""
    src, out_path = Path(src), Path(out_path)
    model = ir.load(str(src))  # weights stay on disk until the rewrites fold constants
    foreign = onnxruntime_only_ops(model.graph)
    if foreign:
        ops = ", ".join(f"{op} x{count}" for op, count in foreign.items())
        raise UserError(f"{src} holds onnxruntime-only ops ({ops}) of export target 'ort'; TensorRT needs "
                        "the standard-op graph: export it with --target portable")
    nodes_before = len(model.graph)
    tagged = len(moe_nodes(model.graph)) if plugin else 0
    applied = GraphPassManager(preparation_passes(plugin, fold_constants))(model)
    rewrites = dict(applied.results[ParserRewritesPass.__name__].rewrites)
    prepared = ir.to_proto(applied.model)
    del model, applied
    if plugin:
        rewrites["GroupedLowRankMoE -> plugin"] = tagged
    _save(prepared, out_path, check=not plugin)
    return PreparedGraph(out_path, plugin, not plugin, nodes_before, len(prepared.graph.node), rewrites)


__all__ = ["FOLD_SIZE_LIMIT", "OP_DOMAIN", "OP_TYPE", "PreparedGraph", "graph_float_type", "onnx_model_files",
           "preparation_passes", "prepare_for_tensorrt"]
