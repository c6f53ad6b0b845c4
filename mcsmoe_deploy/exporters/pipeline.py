"""`mcsmoe export` as a function: checkpoint directory in, validated ONNX file out."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import onnx

from tqdm.auto import tqdm

from ..checkpoint import is_compressed_checkpoint, load_compressed
from ..contract import DECODER_FILE, ENCODER_FILE, external_data_path, inlined_path
from ..files import prepare_output_dir, with_default_permissions
from ..errors import UserError
from ..memory import peak_rss_bytes
from ..models import adapter_for_config, check_weights, load_model, read_config_dict
from .dense import group_dense_experts
from .kv_export import past_graph_spec
from .onnx_file import write_inlined_copy
from .switch_export import export_switch
from .torch_export import check_exportable, finish_staged, logits_graph_spec, stage_graph
from .validate import ExportReport, check_parity, describe, describe_files

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


def _check_output_folder(out_path: str | Path, family: str, with_past: bool, force: bool) -> Path:
    out_path = Path(out_path)
    if not with_past:
        raise UserError(f"{family} exports an encoder graph and a decoder graph with KV cache; "
                        "--no-past is for decoder-only models")
    if out_path.suffix == ".onnx":
        raise UserError(f"{family} exports two graphs ({ENCODER_FILE}, {DECODER_FILE}) into a folder; "
                        f"give a folder name, not {out_path.name}")
    out_path = prepare_output_dir(out_path, force)
    if not os.access(out_path.parent, os.W_OK):
        raise UserError(f"cannot write to {out_path.parent}")
    return out_path


def _export_encoder_decoder(model, adapter, out_dir: Path, passes, external_data, inline):
    """Switch: both graphs into a staging folder beside `out_dir`, renamed into place when all are written."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".staging", dir=out_dir.parent))
    try:
        written = export_switch(model, adapter, staging, passes=passes, external_data=external_data)
        graphs = [written.encoder, written.decoder]
        report = describe_files([onnx.load(str(p), load_external_data=False) for p in graphs], graphs, out_dir)
        pairs = [(ENCODER_FILE, DECODER_FILE)]
        if inline:
            pairs.append(tuple(write_inlined_copy(p).name for p in graphs))
        with_default_permissions(staging)
        if out_dir.exists():  # --force: checked by _check_output_folder
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = [(out_dir / encoder, out_dir / decoder) for encoder, decoder in pairs]
    report.file_bytes = sum(p.stat().st_size for p in out_dir.iterdir())
    if inline:
        report.inlined_path = " + ".join(str(p) for p in files[1])
    return report, files


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
    Decoder-only families (mixtral, qwen2_moe, qwen3_moe, olmoe) write one file;
    Switch Transformers writes `out_path/encoder.onnx` and `out_path/decoder.onnx` (a
    folder; layout in switch_export).
    """
    start = time.perf_counter()
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
    config = read_config_dict(model_dir)
    adapter = adapter_for_config(config)
    check_weights(model_dir)
    compressed = is_compressed_checkpoint(model_dir)
    if target == "ort-fused" and compressed:
        raise UserError("--target ort-fused maps dense experts to com.microsoft.MoE; "
                        f"{model_dir} is a compressed checkpoint (export it with the default target)")
    if adapter.encoder_decoder:
        out_path = _check_output_folder(out_path, adapter.family, with_past, force)
    else:
        out_path = check_output_file(out_path, force)
        if inline:
            check_output_file(inlined_path(out_path), force)

    stages = tqdm(total=2 + (inline and not adapter.encoder_decoder) + validate, desc="loading", unit="stage", disable=not progress,
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
    _next_stage(stages, "tracing and saving")
    if adapter.encoder_decoder:
        report, files = _export_encoder_decoder(model, adapter, out_path, passes, external_data, inline)
    else:
        check_exportable(adapter, 18)
        staged = stage_graph(model, adapter, (past_graph_spec if with_past else logits_graph_spec)(model), out_path)
        del model  # the staged file holds the weights now: free them before the graph is reloaded
        gc.collect()
        model_proto = finish_staged(staged, out_path, passes, external_data)
        report = describe(model_proto, out_path)
        del model_proto
        files = [out_path]
        if inline:
            _next_stage(stages, "writing the inlined copy")
            files.append(write_inlined_copy(out_path))
            report.inlined_path = str(files[-1])
    report.target, report.with_past, report.compressed = target, with_past, compressed
    if validate:
        _next_stage(stages, "validating in onnxruntime")
        # reloaded: for a dense checkpoint, transformers' own model rather than our regrouping of it
        model = None
        gc.collect()
        model = _load_reference(model_dir, compressed)
        report.parity = [check_parity(path, model, with_past) for path in files]
    _next_stage(stages, "done")
    stages.close()
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


__all__ = ["TARGETS", "check_output_file", "export_model", "external_data_path", "inlined_path"]
