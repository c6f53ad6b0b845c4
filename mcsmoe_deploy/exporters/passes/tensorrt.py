"""Passes preparing an exported graph for TensorRT's ONNX parser (needs no TensorRT).

`TagMoEForPluginPass` routes the MoE nodes to a registered GroupedLowRankMoE plugin;
`ParserRewritesPass` folds constants and replaces what the parser does not support
(see runtime/trt_graph.py for the list and the reasons). runtime/trt_graph.py chains them
with the inlining and shape-inference passes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.external_data_helper
import onnx_ir as ir
from onnx import TensorProto

from ...contract import DOMAIN
from .requirements import moe_nodes, require_weight_values

# folded constants larger than this stay computed in the graph (no second copy of weights)
FOLD_SIZE_LIMIT = 64 << 20


class TagMoEForPluginPass(ir.passes.InPlacePass):
    """Give every GroupedLowRankMoE node `plugin_namespace = "ai.mcsmoe"` and `plugin_version = "1"`.

    TensorRT's parser looks plugins up by op type, version and namespace, not by the node's
    domain; the attribute also makes the plugin win over the node's local function.
    A graph without MoE nodes (e.g. target ort-fused) is left as it is.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = moe_nodes(model.graph)
        for node in nodes:
            node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", DOMAIN)
            node.attributes["plugin_version"] = ir.AttrString("plugin_version", "1")
        return ir.passes.PassResult(model, modified=bool(nodes))


@dataclass
class ParserRewritesResult(ir.passes.PassResult):
    """The rewritten model and how many nodes each rewrite replaced."""

    rewrites: dict[str, int] = field(default_factory=dict)


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


def _proto_with_weights(model: ir.Model) -> onnx.ModelProto:
    """`model` as a ModelProto whose initializers hold their bytes (external data read in)."""
    proto = ir.to_proto(model)
    base_dirs = {str(v.const_value.base_dir) for v in model.graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor)}
    for base_dir in base_dirs:  # one in practice: the folder of the source file
        onnx.external_data_helper.load_external_data_for_model(proto, base_dir)
    return proto


class ParserRewritesPass(ir.passes.FunctionalPass):
    """Constant folding (onnx-graphsurgeon, through onnxruntime), then the parser rewrites, cleanup, toposort.

    Requires: every initializer's bytes readable (folding reads them; they are loaded here,
    after shape inference ran on the graph without them). Value shapes and types should be
    inferred first (the rewrites read ranks). Returns a `ParserRewritesResult` counting the
    nodes each rewrite replaced.
    """

    def __init__(self, fold_constants: bool = True):
        super().__init__()
        self.fold_constants = fold_constants

    def requires(self, model: ir.Model) -> None:
        require_weight_values(model.graph.initializers.values(), type(self).__name__)

    def call(self, model: ir.Model) -> ParserRewritesResult:
        import onnx_graphsurgeon as gs

        graph = gs.import_onnx(_proto_with_weights(model))
        if self.fold_constants:  # first, so that sizes known before running count as constants below
            graph.fold_constants(size_threshold=FOLD_SIZE_LIMIT)
        rewrites = _Rewriter(graph).run()
        graph.cleanup().toposort()
        return ParserRewritesResult(ir.from_proto(gs.export_onnx(graph)), modified=True, rewrites=rewrites)


__all__ = ["FOLD_SIZE_LIMIT", "ParserRewritesPass", "ParserRewritesResult", "TagMoEForPluginPass"]
