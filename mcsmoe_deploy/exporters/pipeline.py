"""`mcsmoe export` as a function: checkpoint directory in, validated ONNX file out."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..checkpoint import is_compressed_checkpoint, load_compressed, prepare_output_dir
from ..errors import UserError
from ..models import adapter_for_config, check_weights, read_config_dict
from .torch_export import export_compressed
from .validate import ExportReport, compare_logits, describe


def check_output_file(out_path: str | Path, force: bool) -> Path:
    """UserError unless `out_path` may be written: the shared output rules, plus a writable parent, not a folder."""
    out_path = prepare_output_dir(out_path, force)
    if out_path.is_dir():
        raise UserError(f"output {out_path} is a directory; give a file name such as model.onnx")
    if not os.access(out_path.parent, os.W_OK):
        raise UserError(f"cannot write to {out_path.parent}")
    return out_path


def export_model(
    model_dir: str | Path,
    out_path: str | Path,
    with_past: bool = False,
    validate: bool = True,
    force: bool = False,
) -> ExportReport:
    """Export a compressed checkpoint directory to ONNX, validate it, and describe what was written.

    Today: compressed decoder-only checkpoints (mixtral, qwen2_moe, qwen3_moe, olmoe) to
    a logits graph without KV cache. Dense checkpoints, KV-cache graphs and Switch
    Transformers are refused with a clear message.
    """
    start = time.perf_counter()
    config = read_config_dict(model_dir)
    adapter = adapter_for_config(config)
    check_weights(model_dir)
    if with_past:
        raise UserError("KV-cache (prefill + decode) graphs are not implemented yet; pass --no-past for a logits graph")
    if adapter.encoder_decoder:
        raise UserError(f"ONNX export of {adapter.family} is not implemented yet")
    if not is_compressed_checkpoint(model_dir):
        raise UserError(
            f"{model_dir} is a dense checkpoint; exporting dense models is not implemented yet "
            "(compress it first: `mcsmoe compress --rank-ratio 1` merges without low-rank compression)"
        )
    out_path = check_output_file(out_path, force)
    model = load_compressed(model_dir)
    model_proto = export_compressed(model, adapter, out_path)
    report = describe(model_proto, out_path)
    if validate:
        report.shapes_checked = [(1, 5), (2, 9)]
        report.max_abs_error, report.max_rel_error = compare_logits(
            out_path, model, model.config.vocab_size, tuple(report.shapes_checked)
        )
    report.seconds = time.perf_counter() - start
    return report
