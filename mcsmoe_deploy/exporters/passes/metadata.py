"""Recording where a graph came from in its `metadata_props`."""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir


class SetMetadataPass(ir.passes.InPlacePass):
    """Set `props` (key -> value) in the model's metadata_props, replacing entries of the same key."""

    def __init__(self, props: Mapping[str, str]):
        super().__init__()
        self.props = dict(props)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = any(model.metadata_props.get(key) != value for key, value in self.props.items())
        model.metadata_props.update(self.props)
        return ir.passes.PassResult(model, modified=modified)


# what torch.onnx.export writes on every node for debugging: the Python stack, the FX node, the module
# path (about 2.4 kB a node; 30% of the embedded model's int4 graph). Nothing reads them at run time.
TRACE_METADATA_PREFIXES = ("pkg.torch.", "namespace")


class StripTraceMetadataPass(ir.passes.InPlacePass):
    """Remove the exporter's debugging entries (TRACE_METADATA_PREFIXES) from every node's metadata_props,
    in the graph and in functions; other entries stay."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        nodes = [*ir.traversal.RecursiveGraphIterator(model.graph)]
        nodes += [node for function in model.functions.values() for node in ir.traversal.RecursiveGraphIterator(function)]
        for node in nodes:
            for key in [key for key in node.metadata_props if key.startswith(TRACE_METADATA_PREFIXES)]:
                del node.metadata_props[key]
                modified = True
        return ir.passes.PassResult(model, modified=modified)


__all__ = ["SetMetadataPass", "StripTraceMetadataPass", "TRACE_METADATA_PREFIXES"]
