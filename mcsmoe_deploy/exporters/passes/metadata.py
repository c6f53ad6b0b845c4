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


__all__ = ["SetMetadataPass"]
