"""Inlining every model-local function: a graph of standard ops only, for runtimes without the custom domain.

onnx-ir's `InlinePass` inlines calls by (domain, op type, overload), so each
GroupedLowRankMoE node gets the body of its own overload; it drops the functions it
inlined. Checked against onnx.inliner: on the exported tiny Mixtral KV-cache graph both
give 493 nodes with the same op histogram and bit-identical logits in onnxruntime
(onnx.inliner also keeps the unused ai.mcsmoe import, which the passes below drop);
tests/test_graph_passes.py compares them on dense and low-rank-sparse op bodies.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass


def inline_passes() -> list[ir.passes.PassBase]:
    """Inline every local function, then drop functions nobody calls and opset imports nobody uses.

    The custom domain's import goes too: some runtimes reject a model importing a domain
    they do not know even when no node uses it.
    """
    return [InlinePass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()]


__all__ = ["inline_passes"]
