"""Preparing an exported graph for TensorRT's ONNX parser (needs no TensorRT; checked in onnxruntime).

`prepare_for_tensorrt` writes a copy of a graph from `mcsmoe export` that computes the same
logits with what the parser supports (onnx-tensorrt's operator table for TensorRT 10):

- GroupedLowRankMoE nodes: with a plugin, they get the attribute `plugin_namespace =
  "ai.mcsmoe"` (the parser looks plugins up by op type, `plugin_version` and that
  attribute, not by the node's domain; the attribute also makes the plugin win over the
  local function). Without one, the local functions are inlined (onnx.inliner) into
  standard ops, which constant folding can then reach.
- rewrites inside the MoE bodies: `Compress` (unsupported) -> `Gather` at `NonZero`;
  `ScatterND` with a reduction (unsupported) -> `ScatterElements` with that reduction
  (served by TensorRT's ScatterElements plugin); `NonZero` of a bool tensor -> of a float
  cast (NonZero lists float types only); `Split` with sizes computed at run time ->
  `Gather` of each part's rows (TensorRT 10.0 split such tensors evenly:
  NVIDIA/TensorRT#3892).
- onnx-graphsurgeon: constant folding (through onnxruntime) before the rewrites, then cleanup and
  topological sort.

Shape inference runs on the graph without its weights (so models past protobuf's 2 GB work);
the weights are loaded afterwards for folding, and written as external data when large.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.inliner
import onnx.shape_inference
from onnx import TensorProto

from ..contract import DOMAIN as OP_DOMAIN
from ..contract import OP_TYPE, PAST_PREFIX

FLOAT_TYPES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
# folded constants larger than this stay computed in the graph (no second copy of weights)
FOLD_SIZE_LIMIT = 64 << 20


@dataclass
class PreparedGraph:
    """What `prepare_for_tensorrt` wrote and changed."""

    path: Path
    plugin: bool
    functions_inlined: bool
    nodes_before: int
    nodes_after: int
    rewrites: dict[str, int] = field(default_factory=dict)  # rewrite -> nodes rewritten


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else [])
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def onnx_model_files(path: str | Path) -> list[Path]:
    """The graph file and every external data file it refers to (sorted, each once)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in _tensors(model.graph) if tensor.data_location == TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return [path, *(path.parent / loc for loc in sorted(locations))]


def graph_float_type(path: str | Path) -> str:
    """"fp32" | "fp16" | "bf16": the element type of the graph's KV-cache inputs (else its first float input)."""
    inputs = onnx.load(str(path), load_external_data=False).graph.input
    floats = [i for i in inputs if i.type.tensor_type.elem_type in FLOAT_TYPES]
    pasts = [i for i in floats if i.name.startswith(PAST_PREFIX)]
    return FLOAT_TYPES[(pasts or floats)[0].type.tensor_type.elem_type] if floats else "fp32"


def _tag_for_plugin(model: onnx.ModelProto) -> int:
    count = 0
    for node in model.graph.node:
        if node.op_type == OP_TYPE and node.domain == OP_DOMAIN:
            kept = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
            del node.attribute[:]
            node.attribute.extend(kept + [onnx.helper.make_attribute("plugin_namespace", OP_DOMAIN),
                                          onnx.helper.make_attribute("plugin_version", "1")])
            count += 1
    return count


def _inline(model: onnx.ModelProto) -> onnx.ModelProto:
    inlined = onnx.inliner.inline_local_functions(model)
    used = {n.domain for n in inlined.graph.node}
    keep = [o for o in inlined.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del inlined.opset_import[:]
    inlined.opset_import.extend(keep)
    return inlined


class _Rewriter:
    """Replaces parser-unsupported nodes of an onnx-graphsurgeon graph with supported ones."""

    def __init__(self, graph) -> None:
        self.graph = graph
        self.counts: Counter[str] = Counter()

    def op(self, op: str, *inputs, **attrs):
        return self.graph.layer(op=op, inputs=list(inputs), outputs=[f"trt_{op.lower()}"], attrs=attrs)[0]

    def nonzero_rows(self, condition):
        """1-D int64 indices where `condition` (1-D) is true; NonZero of a float, as TensorRT lists."""
        nonzero = self.op("NonZero", self.op("Cast", condition, to=TensorProto.FLOAT))
        return self.op("Reshape", nonzero, np.array([-1], dtype=np.int64))

    def replace(self, node, outputs: list, name: str) -> None:
        """Make the producers of `outputs` produce `node`'s output tensors instead, so consumers
        and graph outputs see the new values; cleanup then drops `node`."""
        for old, new in zip(list(node.outputs), outputs):
            producer = new.inputs[0]
            node.outputs.remove(old)
            producer.outputs[producer.outputs.index(new)] = old
        self.counts[name] += 1

    def run(self) -> dict[str, int]:
        import onnx_graphsurgeon as gs

        for node in list(self.graph.nodes):
            attrs = node.attrs
            if node.op == "Compress":
                data, condition = node.inputs[:2]
                axis = attrs.get("axis")
                if axis is None:
                    data, axis = self.op("Reshape", data, np.array([-1], dtype=np.int64)), 0
                self.replace(node, [self.op("Gather", data, self.nonzero_rows(condition), axis=axis)],
                             "Compress -> Gather(NonZero)")
            elif node.op == "ScatterND" and attrs.get("reduction", "none") != "none":
                data, indices, updates = node.inputs
                rank = len(data.shape) if data.shape is not None else None
                if indices.shape is None or len(indices.shape) != 2 or indices.shape[-1] != 1 or rank is None:
                    continue  # only rows of axis 0 ([N, 1] indices) map to ScatterElements
                if rank > 2:
                    indices = self.op("Unsqueeze", indices, np.arange(2, rank, dtype=np.int64))
                expanded = self.op("Expand", indices, self.op("Shape", updates))
                self.replace(node, [self.op("ScatterElements", data, expanded, updates, axis=0,
                                            reduction=attrs["reduction"])], "ScatterND(reduction) -> ScatterElements")
            elif node.op == "NonZero" and node.inputs[0].dtype in (bool, np.bool_):
                self.replace(node, [self.op("NonZero", self.op("Cast", node.inputs[0], to=TensorProto.FLOAT))],
                             "NonZero(bool) -> NonZero(float)")
            elif node.op == "Split" and len(node.inputs) > 1 and not isinstance(node.inputs[1], gs.Constant):
                self.replace(node, self._split_by_rows(node), "Split(runtime sizes) -> Gather")
        return dict(self.counts)

    def _split_by_rows(self, node) -> list:
        data, sizes = node.inputs[:2]
        axis = node.attrs.get("axis", 0)
        # part i is the rows r with start_i <= r < end_i; CumSum in float (exact below 2**24 rows)
        ends = self.op("Cast", self.op("CumSum", self.op("Cast", sizes, to=TensorProto.FLOAT),
                                       np.array(0, dtype=np.int64)), to=TensorProto.INT64)
        starts = self.op("Sub", ends, sizes)
        length = self.op("Gather", self.op("Shape", data), np.array(axis, dtype=np.int64), axis=0)
        rows = self.op("Range", np.array(0, dtype=np.int64), length, np.array(1, dtype=np.int64))
        parts = []
        for i in range(len(node.outputs)):
            at = np.array(i, dtype=np.int64)
            inside = self.op("And", self.op("GreaterOrEqual", rows, self.op("Gather", starts, at, axis=0)),
                             self.op("Less", rows, self.op("Gather", ends, at, axis=0)))
            parts.append(self.op("Gather", data, self.nonzero_rows(inside), axis=axis))
        return parts


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


def prepare_for_tensorrt(src: str | Path, out_path: str | Path, plugin: bool = False,
                         fold_constants: bool = True) -> PreparedGraph:
    """Write `src` (an ONNX file from `mcsmoe export`) prepared for TensorRT's parser to
    `out_path` (see the module docstring). plugin: route the MoE nodes to a registered
    GroupedLowRankMoE plugin instead of inlining their functions."""
    import onnx_graphsurgeon as gs

    src, out_path = Path(src), Path(out_path)
    model = onnx.load(str(src), load_external_data=False)
    nodes_before = len(model.graph.node)
    tagged = _tag_for_plugin(model) if plugin else 0
    if not plugin:
        model = _inline(model)
    model = onnx.shape_inference.infer_shapes(model)  # ranks and types for the rewrites
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    graph = gs.import_onnx(model)
    del model
    if fold_constants:  # first, so that sizes known before running count as constants below
        graph.fold_constants(size_threshold=FOLD_SIZE_LIMIT)
    rewrites = _Rewriter(graph).run()
    graph.cleanup().toposort()
    prepared = gs.export_onnx(graph)
    if plugin:
        rewrites["GroupedLowRankMoE -> plugin"] = tagged
    _save(prepared, out_path, check=not plugin)
    return PreparedGraph(out_path, plugin, not plugin, nodes_before, len(prepared.graph.node), rewrites)


__all__ = ["FOLD_SIZE_LIMIT", "OP_DOMAIN", "OP_TYPE", "PreparedGraph", "graph_float_type", "onnx_model_files",
           "prepare_for_tensorrt"]
