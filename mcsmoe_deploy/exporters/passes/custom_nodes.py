"""The first pass of every export: finishing the GroupedLowRankMoE nodes torch.onnx traced."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from ..custom_op import finish_custom_nodes
from ..moe_op import MoEOpSpec
from .requirements import moe_nodes


class FinishCustomNodesPass(ir.passes.InPlacePass):
    """Give each traced MoE node its overload and the model one function per overload (`finish_custom_nodes`).

    per_group: float expert factors become per-group [in, out] initializers (op version 3).
    Requires: one GroupedLowRankMoE node per MoE block in `specs` (the blocks patched while
    tracing).
    """

    def __init__(self, specs: Sequence[MoEOpSpec], per_group: bool = False):
        super().__init__()
        self.specs = list(specs)
        self.per_group = per_group  # float factors per group (op version 3): target ort

    def requires(self, model: ir.Model) -> None:
        found = len(moe_nodes(model.graph))
        if found != len(self.specs):
            raise ir.passes.PreconditionError(
                f"{found} GroupedLowRankMoE nodes in the graph for {len(self.specs)} MoE blocks"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return finish_custom_nodes(model, self.specs, self.per_group)


__all__ = ["FinishCustomNodesPass"]
