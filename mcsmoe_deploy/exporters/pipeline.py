"""`mcsmoe export` as a function: checkpoint directory in, validated ONNX file out."""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..checkpoint import is_compressed_checkpoint, load_compressed, prepare_output_dir
from ..errors import UserError
from ..models import adapter_for_config, check_weights, load_model, read_config_dict
from .dense import group_dense_experts
from .kv_export import export_compressed_with_past
from .onnx_file import external_data_path, inlined_path, write_inlined_copy
from .torch_export import export_compressed
from .validate import ExportReport, check_parity, describe

TARGETS = ("mcsmoe", "ort-fused")


def check_output_file(out_path: str | Path, force: bool) -> Path:
    """UserError unless `out_path` may be written: the shared output rules, plus a writable parent, not a folder."""
    out_path = prepare_output_dir(out_path, force)
    if out_path.is_dir():
        raise UserError(f"output {out_path} is a directory; give a file name such as model.onnx")
    if not os.access(out_path.parent, os.W_OK):
        raise UserError(f"cannot write to {out_path.parent}")
    return out_path


def _load_reference(model_dir: str | Path, compressed: bool):
    # the torch model users know: transformers' own for dense, load_compressed for compressed
    return load_compressed(model_dir) if compressed else load_model(model_dir, device="cpu")[0]


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def source_metadata(model_dir: str | Path, compressed: bool, target: str):
    """A graph pass recording where the graph came from in `metadata_props` (`mcsmoe.*` keys).

    `mcsmoe.source_model` (absolute path) is where `mcsmoe run` looks for the tokenizer.
    """
    from .. import __version__

    props = {"mcsmoe.source_model": str(Path(model_dir).resolve()), "mcsmoe.compressed": str(int(compressed)),
             "mcsmoe.target": target, "mcsmoe.version": __version__}

    def add_metadata(model_proto):
        kept = [p for p in model_proto.metadata_props if p.key not in props]
        del model_proto.metadata_props[:]
        model_proto.metadata_props.extend(kept)
        for key, value in props.items():
            entry = model_proto.metadata_props.add()
            entry.key, entry.value = key, value
        return model_proto

    return add_metadata


def _next_stage(stages: tqdm, name: str) -> None:
    stages.update(1)
    stages.set_description(name)


def export_model(
    model_dir: str | Path,
    out_path: str | Path,
    with_past: bool = True,
    target: str = "mcsmoe",
    validate: bool = True,
    inline: bool = False,
    external_data: bool | None = None,
    force: bool = False,
    progress: bool = False,
) -> ExportReport:
    """Export a dense or compressed checkpoint directory to ONNX, validate it, and describe what was written.

    with_past: one graph for prefill and decode with `past_key_values.N.*` inputs and
        `present.N.*` outputs (see kv_export); False writes a plain logits graph.
    target: "mcsmoe" (every MoE block one ai.mcsmoe::GroupedLowRankMoE node), or
        "ort-fused" (dense SwiGLU checkpoints only: onnxruntime's com.microsoft.MoE).
    validate: compare onnxruntime with the torch reference (transformers' model for a
        dense checkpoint, `load_compressed` for a compressed one) on random tokens.
    inline: also write `inlined_path(out_path)`, every function inlined (standard ops).
    external_data: weights in `OUT.onnx.data`: True, False, or None for "when over ~1.8 GB".
    progress: a bar over the stages (load, trace and save, inline, validate) on stderr.
    Decoder-only families (mixtral, qwen2_moe, qwen3_moe, olmoe).
    """
    start = time.perf_counter()
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
    config = read_config_dict(model_dir)
    adapter = adapter_for_config(config)
    check_weights(model_dir)
    if adapter.encoder_decoder:
        raise UserError(f"ONNX export of {adapter.family} is not implemented yet")
    compressed = is_compressed_checkpoint(model_dir)
    if target == "ort-fused" and compressed:
        raise UserError("--target ort-fused maps dense experts to com.microsoft.MoE; "
                        f"{model_dir} is a compressed checkpoint (export it with the default target)")
    out_path = check_output_file(out_path, force)
    if inline:
        check_output_file(inlined_path(out_path), force)

    stages = tqdm(total=2 + inline + validate, desc="loading", unit="stage", disable=not progress,
                  bar_format="{desc:<28} {n_fmt}/{total_fmt} stages [{elapsed}]")
    passes = [source_metadata(model_dir, compressed, target)]
    if target == "ort-fused":
        from .ort_fused import fuse_moe_for_ort

        passes.append(fuse_moe_for_ort)
    model = _load_reference(model_dir, compressed)
    layout = adapter.expert_layout(model.config)
    if target == "ort-fused" and not (layout.gated and layout.activation in ("silu", "swish")):
        raise UserError(f"--target ort-fused needs SwiGLU experts; {adapter.family} experts are "
                        f"{'gated' if layout.gated else 'plain'} {layout.activation}")
    if not compressed:
        group_dense_experts(model, adapter)
    exporter = export_compressed_with_past if with_past else export_compressed
    _next_stage(stages, "tracing and saving")
    model_proto = exporter(model, adapter, out_path, passes=passes, external_data=external_data)
    report = describe(model_proto, out_path)
    report.target, report.with_past, report.compressed = target, with_past, compressed
    del model_proto
    files = [out_path]
    if inline:
        _next_stage(stages, "writing the inlined copy")
        files.append(write_inlined_copy(out_path))
        report.inlined_path = str(files[-1])
    if validate:
        _next_stage(stages, "validating in onnxruntime")
        if not compressed:  # validate against transformers' own model, not our regrouping of it
            del model
            gc.collect()
            model = _load_reference(model_dir, compressed)
        report.parity = [check_parity(path, model, with_past) for path in files]
    _next_stage(stages, "done")
    stages.close()
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = _peak_rss_bytes()
    return report


__all__ = ["TARGETS", "check_output_file", "export_model", "external_data_path", "inlined_path"]
