"""Tracing a model with torch.onnx (dynamo) into a checked ONNX file, MoE blocks as custom nodes.

Everything but the experts (embeddings, attention, norms, Qwen2-MoE's shared expert and
its gate) is traced from the real transformers model; each MoE block becomes one
`ai.mcsmoe::GroupedLowRankMoE` node (see custom_op), and each QuantizedLinear a blocked
DequantizeLinear + MatMul (see quantized_linear_export).

Export happens in two steps so that a caller can hold the weights only once:
`stage_graph` traces and streams the traced graph, weights as external data, into a
staging folder beside the output (the torch tensors are written as they are, without a
second copy in memory); after the caller drops its torch model, `finish_staged` reloads
the graph without its weights, adds the op's functions, runs the onnx-ir graph passes
(exporters/passes; weights read lazily from disk by the passes that need them), checks
and renames into place.
`export_with_custom_moe` does both for callers who keep their model.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch

from ..models.base import FamilyAdapter
from .custom_op import TORCH_OP, ForwardFactory, moe_blocks_as_custom_op, patched_forward, translate
from .moe_op import MoEOpSpec, register_op_schema
from ..contract import PADDING_SIDE, external_data_path
from ..errors import UserError
from ..files import new_staging_dir, staged_output
from .export_config import ExportConfig
from .ort_attention import FusionPlan, ort_modules_fused
from .ort_ops import register_norm_schema, translation_table as ort_translation_table
from .onnx_file import EXTERNAL_DATA_THRESHOLD, write_passes_result, write_staged, write_staged_as_one_file
from .passes import GraphPassManager
from ..quantized_embedding import quantized_embedding
from ..quantized_linear import quantized_matmul
from .quantized_embedding_export import register_gather_schema, translate_quantized_embedding
from .quantized_linear_export import FinishQuantizedMatMulsPass, register_trace_schema, translate_quantized_matmul
from .passes.custom_nodes import FinishCustomNodesPass

_INLINE_BYTES = 1024  # tensors up to this size stay in the graph file (as onnx's size_threshold)
_IN_FLIGHT_BYTES = 64 << 20  # bound on weight bytes being written at once while staging


@dataclass
class GraphSpec:
    """What to trace: a module calling the model, example inputs, I/O names, dynamic shapes."""

    wrapper: torch.nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: Any


@dataclass
class StagedGraph:
    """A traced graph in `staging/<output name>`, weights in its `.data` file; custom nodes not finished."""

    path: Path
    specs: list[MoEOpSpec]
    fusion: FusionPlan | None = None  # target "ort": which attention / norm modules became onnxruntime ops

    @property
    def staging(self) -> Path:
        return self.path.parent


class _LogitsWrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def logits_graph_spec(model: torch.nn.Module) -> GraphSpec:
    """A logits graph: `input_ids`, `attention_mask` [B, S] int64 -> `logits` [B, S, V]; B and S dynamic."""
    ids = torch.randint(0, model.config.vocab_size, (2, 8), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=max(16, getattr(model.config, "max_position_embeddings", 4096)))
    return GraphSpec(
        _LogitsWrapper(model).eval(), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], ["logits"],
        {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )


def check_exportable(adapter: FamilyAdapter, opset: int) -> None:
    if not adapter.exportable:
        reason = adapter.not_exportable_because
        raise NotImplementedError(f"no one-graph ONNX export of family {adapter.family!r}: {reason}")
    if opset < 18:
        raise ValueError("opset must be >= 18 (the op's function body needs it)")
    if not register_op_schema():
        raise RuntimeError("this onnx cannot register op schemas from Python; upgrade onnx")


def stage_graph(
    model: torch.nn.Module,
    adapter: FamilyAdapter,
    spec: GraphSpec,
    out_path: str | Path,
    opset: int = 18,
    make_forward: ForwardFactory = patched_forward,
    fuse_ort: bool = False,
) -> StagedGraph:
    """Trace `spec.wrapper(*spec.args)` with MoE blocks as custom nodes and stream it into a staging folder.

    fuse_ort: attention and RMSNorm modules trace to onnxruntime's fused ops (target "ort",
    see ort_attention); the plan of what was fused is kept in the StagedGraph.
    """
    # onnxscript only emits the bare nodes of ops it has a schema of
    if not (register_op_schema() and register_trace_schema() and register_gather_schema()):
        raise RuntimeError("this onnx cannot register op schemas from Python; upgrade onnx")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    table = {
        getattr(torch.ops.mcsmoe, TORCH_OP.split("::")[1]).default: translate,
        quantized_matmul._opoverload: translate_quantized_matmul,  # QuantizedLinear
        quantized_embedding._opoverload: translate_quantized_embedding,  # QuantizedEmbedding
    }
    fused_modules = ort_modules_fused(model) if fuse_ort else contextlib.nullcontext()
    if fuse_ort:
        register_norm_schema()
        table.update(ort_translation_table())
    try:
        with torch.no_grad(), moe_blocks_as_custom_op(model, adapter, make_forward) as specs, fused_modules as plan:
            program = torch.onnx.export(
                spec.wrapper,
                tuple(spec.args),
                dynamo=True,
                opset_version=opset,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_shapes=spec.dynamic_shapes,
                custom_translation_table=table,
                optimize=True,
                verbose=False,
            )
    finally:
        model.train(was_training)
    if plan is not None and plan.attention:  # GroupQueryAttention reads right-padded rows (ort_attention)
        program.model.metadata_props[PADDING_SIDE] = "right"
    staging = new_staging_dir(out_path)
    try:
        staged = staging / out_path.name
        ir.save(program.model, staged, external_data=external_data_path(out_path).name,
                max_in_flight_bytes=_IN_FLIGHT_BYTES)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        # onnxscript's rewriter keeps the last graph it matched alive (module-level pattern
        # matchers hold its nodes), so detach the graph from the torch tensors: without this
        # the weights outlive the caller's model and the export holds them twice
        for value in program.model.graph.initializers.values():
            value.const_value = None
    return StagedGraph(staged, list(specs.values()), plan)


def _holds_weights(model: ir.Model) -> bool:
    """Whether a pass left weight bytes in memory (new tensors), beyond small constants."""
    return any(
        value.const_value is not None and not isinstance(value.const_value, ir.ExternalTensor)
        and value.const_value.nbytes > _INLINE_BYTES
        for value in model.graph.initializers.values()
    )


# onnxruntime repacks these nodes' weights at load (MLAS's layouts); from a memory-mapped data file it drops
# the pages it repacked, from the graph file itself it keeps them beside the packed copy (~0.5-1x more)
_REPACKED_AT_LOAD = {("com.microsoft", "MatMulNBits"), ("com.microsoft", "QMoE")}


# float weights past this many bytes go to the data file by default: onnxruntime memory-maps it, and
# decodes the 330 MB benchmark Mixtral's fp32 graph ~12% faster than from one file (its MoE kernel
# reading the mapped weights; cause not traced) while holding less (1.05x against 1.1-1.4x its bytes;
# benchmarks/results/session-memory.md). The 9 MB embedded graph decodes the same either way.
LARGE_WEIGHTS_BYTES = 64 << 20


def default_external_data(model: ir.Model, weight_bytes: int) -> bool:
    """Whether a graph goes out with its weights in `OUT.onnx.data` when the user did not say: when it
    holds nodes onnxruntime repacks at load (quantized graphs of targets ort and ort-qmoe), or when its
    `weight_bytes` pass LARGE_WEIGHTS_BYTES (64 MiB; one protobuf holds at most about 1.8 GB)."""
    repacked = any((node.domain, node.op_type) in _REPACKED_AT_LOAD for node in model.graph)
    return repacked or weight_bytes > LARGE_WEIGHTS_BYTES


def finish_staged(staged: StagedGraph, out_path: str | Path, config: ExportConfig = ExportConfig()) -> onnx.ModelProto:
    """Finish the MoE nodes, run `config.graph_passes()`, check (full_check) and move into `out_path`.

    config.external_data: True keeps the weights in `OUT.onnx.data`; False writes one file (refused
    past about 1.8 GB, protobuf's 2 GB limit); None keeps external data for graphs onnxruntime
    repacks at load and for weights past 64 MiB: `default_external_data`. The passes run
    on an `ir.Model` whose weights stay in the staged data file: a pass that reads values
    (ort-fused) reads them through a memory map, and a single file is streamed from disk
    (`write_staged_as_one_file`); when a pass made new weights, every weight is streamed
    afresh (`write_passes_result`). A failing pass raises `GraphPassError` naming it.
    Returns the final graph without weight values.
    """
    companions = (external_data_path(out_path).name,)
    try:
        with staged_output(out_path, force=True, kind="file", companions=companions) as target:
            data = external_data_path(staged.path)
            data_bytes = data.stat().st_size if data.exists() else 0
            if config.external_data is False and data_bytes > EXTERNAL_DATA_THRESHOLD:
                raise UserError(f"the weights ({data_bytes / 1e9:.1f} GB) do not fit in one ONNX file (protobuf's "
                                "2 GB limit); drop --no-external-data")
            model = ir.from_proto(onnx.load(str(staged.path), load_external_data=False))
            ir.external_data.set_base_dir(model.graph, staged.staging)
            # QuantizedLinear placeholders first: they may raise the opset the MoE functions are built for
            passes = [FinishQuantizedMatMulsPass(config.fuses_ort), FinishCustomNodesPass(staged.specs, config.per_group_experts), *config.graph_passes()]
            model = GraphPassManager(passes)(model).model
            external = config.external_data if config.external_data is not None else \
                default_external_data(model, data_bytes)
            if _holds_weights(model):
                return write_passes_result(model, staged.path, target, external)
            model_proto = ir.to_proto(model)  # external tensors stay references to the staged data
            del model
            if external:
                write_staged(model_proto, staged.path, target, external_data=False)
            else:
                write_staged_as_one_file(model_proto, staged.path, target)
    finally:
        shutil.rmtree(staged.staging, ignore_errors=True)
    return model_proto


def export_with_custom_moe(
    model: torch.nn.Module,
    adapter: FamilyAdapter,
    spec: GraphSpec,
    out_path: str | Path,
    config: ExportConfig = ExportConfig(),
    make_forward: ForwardFactory = patched_forward,
) -> onnx.ModelProto:
    """`stage_graph` then `finish_staged`, for a caller that keeps its model (see the module docstring)."""
    staged = stage_graph(model, adapter, spec, out_path, config.opset, make_forward, config.fuses_ort)
    return finish_staged(staged, out_path, config)


def export_compressed(
    model: torch.nn.Module,
    adapter: FamilyAdapter,
    out_path: str | Path,
    config: ExportConfig = ExportConfig(),
) -> onnx.ModelProto:
    """Export a decoder-only model whose experts are GroupedLowRankExperts to a logits graph.

    Inputs `input_ids`, `attention_mask` [B, S] int64, output `logits` [B, S, V], batch and
    sequence dynamic, no KV cache. Every MoE block's experts become one
    `ai.mcsmoe::GroupedLowRankMoE` node. `config` gives the opset, the graph passes (its
    target's, e.g. ort-fused, then `config.passes`) and external data (as in
    `finish_staged`); `config.with_past` is not read (see `export_compressed_with_past`).
    Returns the saved ModelProto (checked with onnx.checker full_check).
    """
    return export_graph(model, adapter, logits_graph_spec, out_path, config)


def export_graph(
    model: torch.nn.Module,
    adapter: FamilyAdapter,
    make_spec: Callable[[torch.nn.Module], GraphSpec],
    out_path: str | Path,
    config: ExportConfig = ExportConfig(),
) -> onnx.ModelProto:
    """Check the family and opset, then `stage_graph` and `finish_staged` the graph `make_spec(model)` describes."""
    check_exportable(adapter, config.opset)
    staged = stage_graph(model, adapter, make_spec(model), out_path, config.opset, fuse_ort=config.fuses_ort)
    return finish_staged(staged, out_path, config)


__all__ = [
    "GraphSpec",
    "StagedGraph",
    "check_exportable",
    "export_compressed",
    "export_graph",
    "export_with_custom_moe",
    "finish_staged",
    "logits_graph_spec",
    "stage_graph",
]
