"""`mcsmoe export` as a function: checkpoint directory in, validated ONNX file out."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import torch
from tqdm.auto import tqdm

from ..checkpoint import is_compressed_checkpoint, is_quantized_checkpoint, load_compressed
from ..contract import DECODER_FILE, ENCODER_FILE, external_data_path, inlined_path
from ..corpus import copy_tokenizer_files
from ..files import check_output, staged_output
from ..errors import UserError
from ..memory import peak_rss_bytes, release_freed_memory
from ..models import FamilyAdapter, adapter_for_config, check_weights, load_model, read_config_dict
from ..compress.quantize import quantize_model
from .dense import group_dense_experts
from .export_config import TARGETS, ExportConfig
from .genai_folder import GRAPH_FILE, check_genai_source, write_genai_files
from .kv_export import past_graph_spec
from .onnx_file import write_inlined_copy
from .passes.metadata import SetMetadataPass
from .switch_export import export_switch
from .torch_export import check_exportable, finish_staged, logits_graph_spec, stage_graph
from .validate import ExportReport, check_parity, describe, describe_files, record_reference


def check_output_file(out_path: str | Path, force: bool, inputs: tuple[str | Path, ...] = (),
                      companions: tuple[str, ...] = ()) -> Path:
    """UserError unless `out_path` (and its `companions` beside it) may be written: files.check_output's
    rules (apart from `inputs`, parent writable), and not a folder."""
    if Path(out_path).is_dir() and not Path(out_path).is_symlink():
        raise UserError(f"output {out_path} is a directory; give a file name such as model.onnx")
    return check_output(out_path, force=force, inputs=inputs, kind="file", companions=companions)


def _graph_companions(out_path: Path, inline: bool) -> tuple[str, ...]:
    """Files written beside a decoder graph: its external data, and the inlined copy (which shares that data)."""
    return (external_data_path(out_path).name, *((inlined_path(out_path).name,) if inline else ()))


def _load_reference(model_dir: str | Path, compressed: bool, adapter: FamilyAdapter, config: ExportConfig,
                    dtype: torch.dtype):
    # the torch model users know: transformers' own for dense, load_compressed for compressed; with
    # config.quantize, that model quantized in memory (dense experts first grouped one per group); in
    # `dtype` whatever the checkpoint's (a bf16 checkpoint's weights upcast to fp32 exactly)
    model = load_compressed(model_dir) if compressed else load_model(model_dir, device="cpu")[0]
    if config.quant_spec is not None:
        group_dense_experts(model, adapter)
        quantize_model(model, adapter, config.quant_spec, config.quant_scope)
    return model.to(dtype)


def source_metadata(model_dir: str | Path, compressed: bool, target: str) -> SetMetadataPass:
    """A graph pass recording where the graph came from in `metadata_props` (`mcsmoe.*` keys).

    `mcsmoe.source_model` (absolute path) is where `mcsmoe run` looks for the tokenizer.
    """
    from .. import __version__

    return SetMetadataPass({"mcsmoe.source_model": str(Path(model_dir).resolve()),
                            "mcsmoe.compressed": str(int(compressed)), "mcsmoe.target": target,
                            "mcsmoe.version": __version__})


def _check_output_folder(out_path: str | Path, what: str, force: bool, inputs: tuple[str | Path, ...]) -> Path:
    """`what` says what goes into the folder, for the message when `out_path` looks like a file name."""
    out_path = Path(out_path)
    if out_path.suffix == ".onnx":
        raise UserError(f"{what} into a folder; give a folder name, not {out_path.name}")
    return check_output(out_path, force=force, inputs=inputs, kind="dir")


def _export_encoder_decoder(model, adapter, model_dir: Path, out_dir: Path, config: ExportConfig):
    """Switch: both graphs and the tokenizer files into one folder, written through `staged_output`."""
    with staged_output(out_dir, force=config.force, inputs=(model_dir,)) as staging:
        written = export_switch(model, adapter, staging, config)
        graphs = [written.encoder, written.decoder]
        report = describe_files([onnx.load(str(p), load_external_data=False) for p in graphs], graphs, out_dir)
        pairs = [(ENCODER_FILE, DECODER_FILE)]
        if config.inline:
            pairs.append(tuple(write_inlined_copy(p).name for p in graphs))
        copy_tokenizer_files(model_dir, staging)  # the folder is served on its own (`mcsmoe run OUT/`)
    files = [(out_dir / encoder, out_dir / decoder) for encoder, decoder in pairs]
    report.file_bytes = sum(p.stat().st_size for p in out_dir.iterdir())
    if config.inline:
        report.inlined_path = " + ".join(str(p) for p in files[1])
    return report, files


def _write_decoder(model, adapter, target: Path, config: ExportConfig, stages: tqdm):
    """A decoder-only graph (and its inlined copy) at `target`, a path inside a staging folder; `model`'s
    weights are freed once the staged file holds them. Returns (the graph without weights, what was
    fused for onnxruntime or None)."""
    check_exportable(adapter, config.opset)
    make_spec = past_graph_spec if config.with_past else logits_graph_spec
    staged = stage_graph(model, adapter, make_spec(model), target, config.opset, fuse_ort=config.fuses_ort)
    model.to("meta")  # the staged file holds the weights now: free them before the graph is reloaded
    release_freed_memory()
    model_proto = finish_staged(staged, target, config)
    if config.inline:
        _next_stage(stages, "writing the inlined copy")
        write_inlined_copy(target)
    return model_proto, staged.fusion


def _export_decoder(model, adapter, model_dir: str | Path, out_path: Path, config: ExportConfig, stages: tqdm):
    """One decoder graph file (with its data and inlined copy beside it), written through `staged_output`."""
    with staged_output(out_path, force=config.force, inputs=(model_dir,), kind="file",
                       companions=_graph_companions(out_path, config.inline)) as target:
        model_proto, fusion = _write_decoder(model, adapter, target, config, stages)
    return _describe_decoder(model_proto, out_path, config, fusion)


def _export_genai_folder(model, adapter, model_dir: str | Path, out_dir: Path, config: ExportConfig, stages: tqdm):
    """The decoder graph plus genai_config.json and tokenizer files in one folder, through `staged_output`."""
    with staged_output(out_dir, force=config.force, inputs=(model_dir,)) as staging:
        model_proto, fusion = _write_decoder(model, adapter, staging / GRAPH_FILE, config, stages)
        write_genai_files(model_dir, staging / GRAPH_FILE)
    return _describe_decoder(model_proto, out_dir / GRAPH_FILE, config, fusion)


def _describe_decoder(model_proto: onnx.ModelProto, graph: Path, config: ExportConfig, fusion):
    report = describe(model_proto, graph)
    report.fusion = None if fusion is None else fusion.summary()
    files = [graph]
    if config.inline:
        files.append(inlined_path(graph))
        report.inlined_path = str(files[-1])
    return report, files


def _next_stage(stages: tqdm, name: str) -> None:
    stages.update(1)
    stages.set_description(name)


def export_model(
    model_dir: str | Path, out_path: str | Path, config: ExportConfig | None = None, **options: Any
) -> ExportReport:
    """Export a dense or compressed checkpoint directory to ONNX, validate it, and describe what was written.

    config: an `ExportConfig` (target, with_past, validate, inline, external_data, opset,
    force, progress, passes); or give its fields as keyword `options`, e.g.
    `export_model(src, "model.onnx", with_past=False, validate=False)`; not both.
    Validation compares onnxruntime with the torch reference (transformers' model for a
    dense checkpoint, `load_compressed` for a compressed one; with `quantize`, that model
    quantized in memory as `compress.quantize.quantize_model` does) on random tokens; progress
    shows a bar over the stages (load, trace and save, inline, validate) on stderr.
    Decoder-only families (mixtral, qwen2_moe, qwen3_moe, olmoe) write one file;
    Switch Transformers writes `out_path/encoder.onnx` and `out_path/decoder.onnx` (a
    folder; layout in switch_export).
    """
    if config is not None and options:
        raise TypeError("export_model takes an ExportConfig or its fields as keywords, not both")
    config = config if config is not None else ExportConfig(**options)
    start = time.perf_counter()
    adapter = adapter_for_config(read_config_dict(model_dir))
    check_weights(model_dir)
    compressed = is_compressed_checkpoint(model_dir)
    config.check_checkpoint(str(model_dir), adapter.family, adapter.encoder_decoder, compressed)
    if config.dtype != "fp32" and compressed and is_quantized_checkpoint(model_dir):
        raise UserError(f"{model_dir} stores quantized weights, whose fp32 scales feed fp32 MatMuls: export it as fp32")
    if config.quantize is not None and compressed and is_quantized_checkpoint(model_dir):
        raise UserError(f"{model_dir} is already quantized; export it without --quantize")
    if compressed and adapter.encoder_decoder and is_quantized_checkpoint(model_dir):
        # the graphs build and run, but parity with load_compressed was 8e-4 relative on the tiny
        # merged Switch model (1e-5 low rank), above the 1e-4 every export promises: not offered yet
        raise UserError(f"{model_dir} stores quantized experts of {adapter.family}; exporting them is built for "
                        "decoder-only families (mixtral, qwen2_moe, qwen3_moe, olmoe) only")
    if config.genai:
        check_genai_source(model_dir)
        out_path = _check_output_folder(out_path, f"an onnxruntime-genai model goes ({GRAPH_FILE}, genai_config.json, "
                                        "tokenizer files)", config.force, (model_dir,))
    elif adapter.encoder_decoder:
        out_path = _check_output_folder(out_path, f"{adapter.family} exports two graphs ({ENCODER_FILE}, "
                                        f"{DECODER_FILE})", config.force, (model_dir,))
    else:
        out_path = check_output_file(out_path, config.force, (model_dir,), _graph_companions(out_path, config.inline))

    fusion_note = None
    if adapter.encoder_decoder and config.fuses_ort:
        # T5-style attention (relative position bias, no rotary) has no GroupQueryAttention form
        config = replace(config, target="portable")
        fusion_note = f"{adapter.family}: no fused attention for encoder-decoder graphs; exported as 'portable'"
    inline_stage = config.inline and not adapter.encoder_decoder
    stages = tqdm(total=2 + inline_stage + config.validate, desc="loading", unit="stage",
                  disable=not config.progress, bar_format="{desc:<28} {n_fmt}/{total_fmt} stages [{elapsed}]")
    # each graph goes through the target's passes, then records its source, then the caller's passes
    config = replace(config, passes=(source_metadata(model_dir, compressed, config.target), *config.passes))
    # decoder-only: the torch reference's logits are recorded first, from the very model about to be traced
    # (in fp32 for any graph dtype: the function the checkpoint defines; torch's own fp16 CPU arithmetic
    # rounds differently from onnxruntime's, and neither is the authority), so that validation needs no
    # second load and holds nothing of torch's while onnxruntime opens the graph
    reference = None
    record_first = config.validate and not adapter.encoder_decoder
    model = _load_reference(model_dir, compressed, adapter, config,
                            torch.float32 if record_first else config.torch_dtype)
    config.check_experts(adapter.family, adapter.expert_layout(model.config))
    if record_first:
        reference = record_reference(model, config.with_past)
        model.to(config.torch_dtype)  # an fp16 graph: the cast _load_reference makes, from exact fp32 values
    if not compressed:
        group_dense_experts(model, adapter)
    _next_stage(stages, "tracing and saving")
    if adapter.encoder_decoder:
        report, files = _export_encoder_decoder(model, adapter, Path(model_dir), out_path, config)
    elif config.genai:
        report, files = _export_genai_folder(model, adapter, model_dir, out_path, config, stages)
    else:
        report, files = _export_decoder(model, adapter, model_dir, out_path, config, stages)
    del model
    report.target, report.with_past, report.compressed = config.target, config.with_past, compressed
    report.fusion = fusion_note or report.fusion
    if config.validate:
        _next_stage(stages, "validating in onnxruntime")
        release_freed_memory()  # what tracing freed goes back before onnxruntime allocates the graph's weights
        if reference is None:  # Switch: steps through the reloaded torch model (in fp32, as above) beside onnxruntime
            reference = _load_reference(model_dir, compressed, adapter, config, torch.float32)
        report.parity = [check_parity(path, reference, config.with_past) for path in files]
    _next_stage(stages, "done")
    stages.close()
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


__all__ = ["TARGETS", "ExportConfig", "check_output_file", "export_model", "external_data_path", "inlined_path"]
