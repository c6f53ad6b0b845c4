"""Plain-text tables for the terminal: what a compression run, the demo, an export, a generation or a
bench produced.

Data flows one way: the stages and the demo make reports, the CLI hands them here. This module reads
report dataclasses and imports none of the stages (their report types are named for type checkers only).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .report import DemoResult, ServingResult

if TYPE_CHECKING:
    from .compress import CompressionResult
    from .exporters import ExportReport
    from .runtime import BenchReport
    from .runtime.compare import Comparison
    from .runtime.text import TextGeneration


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} GB"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns left-aligned for the first, right-aligned for the rest."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}x" if before else "-"


def format_compression(result: CompressionResult) -> str:
    """Per-layer groups and ranks, then sizes before and after."""
    layer_rows = []
    for layer, before, after in zip(result.applied.layers, result.before.layers, result.after.layers):
        ranks = ", ".join(
            f"{name}:{'dense' if spec.rank is None else spec.rank}{f'+{spec.sparse_rows}r' if spec.sparse_rows else ''}"
            + (f" {spec.quant.name}" if spec.quant else "") + (f" shared {spec.shared}" if spec.shared else "")
            for name, spec in layer.projections.items()
        )
        layer_rows.append([layer.name, str(layer.grouping.num_groups), ranks, f"{before.parameters:,}",
                           f"{after.parameters:,}", _ratio(after.parameters, before.parameters)])
    b, a = result.before, result.after
    size_rows = [
        ["experts", f"{b.expert_parameters:,}", f"{a.expert_parameters:,}", _ratio(a.expert_parameters, b.expert_parameters),
         human_bytes(b.expert_bytes), human_bytes(a.expert_bytes)],
        ["total", f"{b.total_parameters:,}", f"{a.total_parameters:,}", _ratio(a.total_parameters, b.total_parameters),
         human_bytes(b.total_bytes), human_bytes(a.total_bytes)],
    ]
    parts = [
        table(["layer", "groups", "rank per projection (+sparse rows)", "params before", "params after", "ratio"], layer_rows),
        "",
        table(["", "params before", "params after", "ratio", "bytes before", "bytes after"], size_rows),
        "",
        f"calibration tokens: {result.applied.calibration_tokens:,}   time: {result.seconds:.1f} s",
    ]
    if result.distill is not None:
        report = result.distill
        parts.append(f"distillation: {report.steps} steps at peak rate {report.lr:g}, "
                     f"loss {report.first_loss:.3f} -> {report.last_loss:.3f}")
    if result.router_calibration is not None:
        report = result.router_calibration
        parts.append(f"router calibration: {report.steps} steps at peak rate {report.lr:g}, "
                     f"KL to dense {report.first_loss:.4f} -> {report.last_loss:.4f}")
    if result.out_dir is not None:
        parts.append(f"wrote {result.out_dir}")
    return "\n".join(parts)


def format_demo(result: DemoResult) -> str:
    """The demo's rows with ratios to dense, its timings, and the serving half if it ran."""
    dense = result.rows[0]
    rows = [
        [r.name, f"{r.parameters:,}", human_bytes(r.bytes), _ratio(r.bytes, dense.bytes), f"{r.expert_parameters:,}",
         _ratio(r.expert_parameters, dense.expert_parameters), f"{r.perplexity:.2f}", _ratio(r.perplexity, dense.perplexity)]
        for r in result.rows
    ]
    parts = [
        f"model: {result.model_dir}",
        "",
        table(["model", "params", "bytes", "vs dense", "expert params", "vs dense", "held-out ppl", "vs dense"], rows),
        "",
        f"compression: {result.compress_seconds:.1f} s   total: {result.total_seconds:.1f} s",
    ]
    if result.out_dir:
        parts.append(f"wrote {result.out_dir}")
    if result.serving is not None:
        parts += ["", _format_serving(result.serving)]
    return "\n".join(parts)


def _format_serving(serving: ServingResult) -> str:
    """The demo's second half: exported graphs, onnxruntime latency and memory, a sample of each."""
    bench = serving.bench
    dense = bench.results[0]
    rows = []
    for export, r in zip(serving.exports, bench.results):
        rows.append([r.name, human_bytes(export.file_bytes), f"{export.max_rel_error:.1e}",
                     f"{r.prefill.p50_ms:.2f}", f"{r.decode.p50_ms:.2f}", _ratio(r.decode.p50_ms, dense.decode.p50_ms),
                     f"{r.decode_tokens_per_second:.0f}", human_bytes(r.peak_rss_bytes),
                     _ratio(r.peak_rss_bytes, dense.peak_rss_bytes)])
    cfg = bench.config
    parts = [
        f"served with onnxruntime (CPU), batch {cfg.batch}, {cfg.prompt_len}-token prompt, p50 of "
        f"{cfg.iterations} x {cfg.decode_tokens} decode steps:",
        table(["model", "ONNX", "vs torch", "prefill ms", "decode ms/token", "vs dense", "tok/s", "peak RSS",
               "vs dense"], rows),
        "",
    ]
    for name, prompt, completion in serving.samples:
        text = " ".join(f"{prompt}{completion}".split())  # one line: newlines and runs of spaces collapsed
        parts.append(f"{name + ':':<12} {text[:160]}")
    return "\n".join(parts)


def format_export(report: ExportReport) -> str:
    """What was written and how closely onnxruntime follows torch."""
    kind = "KV-cache graph (prefill + decode)" if report.with_past else "logits graph (no KV cache)"
    if Path(report.path).is_dir():
        kind = "encoder.onnx + decoder.onnx (decoder with KV cache)"
    source = "compressed" if report.compressed else "dense"
    custom = ", ".join(f"{op} x{count}" for op, count in report.custom_nodes.items()) or "none"
    lines = [
        f"wrote {report.path} ({human_bytes(report.file_bytes)}): {kind} of a {source} model, target {report.target}",
        f"nodes: {report.nodes}   custom nodes: {custom}   functions: {report.functions}",
    ]
    if report.fusion:
        lines.append(f"fused for onnxruntime: {report.fusion}")
    if report.accuracy_levels:
        kernels = ", ".join(f"{op} x{count} at {level}" for op, by_level in report.accuracy_levels.items()
                            for level, count in by_level.items())
        checked = "; the parity check below runs them at 0" if report.parity else ""
        lines.append(f"quantized kernels by accuracy level (4: int8 activations, 0: float32): {kernels}{checked}")
    if report.inlined_path:
        ops = "onnxruntime contrib ops kept" if report.target == "ort" else "standard ops"
        lines.append(f"wrote {report.inlined_path}: the same graph with functions inlined ({ops})")
    for check in report.parity:
        runs = ", ".join(f"{b}x{s}" for b, s in check.shapes) + (" + 1 decode step each" if check.with_past else "")
        names = " + ".join(Path(p).name for p in check.path.split(" + "))
        lines.append(f"onnxruntime vs torch, {names} on {runs}: "
                     f"max abs error {check.max_abs_error:.2e}, relative {check.max_rel_error:.2e}")
    lines.append(f"time: {report.seconds:.1f} s   peak RSS: {human_bytes(report.peak_rss_bytes)}")
    return "\n".join(lines)


def format_generation(text: TextGeneration) -> str:
    """Each prompt with its continuation, then the timings."""
    parts = []
    for prompt, completion in zip(text.prompts, text.completions):
        parts += [f"> {prompt}", f"{prompt}{completion}", ""]
    result = text.result
    steps = result.decode_seconds
    per_token = f"{1000 * sum(steps) / len(steps):.2f} ms per decode step" if steps else "no decode steps"
    where = ", ".join(f"{k}={v}" for k, v in text.session.items() if k != "path")
    parts.append(f"{result.generated} tokens; prefill {1000 * result.prefill_seconds:.1f} ms, {per_token} ({where})")
    return "\n".join(parts)


def format_bench(report: BenchReport) -> str:
    """One row per contestant, then ratios to the first (same run)."""
    cfg = report.config
    rows = [
        [r.name, f"{r.load_seconds:.2f}", f"{r.prefill.p50_ms:.1f}", f"{r.prefill.p90_ms:.1f}", f"{r.prefill.p99_ms:.1f}",
         f"{r.decode.p50_ms:.2f}", f"{r.decode.p90_ms:.2f}", f"{r.decode.p99_ms:.2f}", f"{r.decode_tokens_per_second:.1f}",
         human_bytes(r.peak_rss_bytes), human_bytes(r.bytes_on_disk), f"{r.decode_floor_ms:.2f}", f"{r.decode_vs_floor:.2f}x"]
        for r in report.results
    ]
    ratios = report.ratios()
    ratio_rows = [[name, *(f"{value:.3f}x" for value in metrics.values())] for name, metrics in ratios.items()]
    gpu = report.machine.get("gpu")
    return "\n".join([
        f"batch {cfg.batch}, prompt {cfg.prompt_len} tokens, {cfg.decode_tokens} decode steps, "
        f"{cfg.iterations} iterations after {cfg.warmup} warm-up, threads {cfg.threads or 'default'}; "
        f"memory bandwidth {report.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s" + (f"; GPU {gpu}" if gpu else ""),
        "",
        table(["model", "load s", "prefill p50 ms", "p90", "p99", "decode p50 ms", "p90", "p99", "tok/s", "peak RSS",
               "on disk", "floor ms", "vs floor"], rows),
        "",
        f"ratios to {report.baseline} (same run):",
        table(["model", *next(iter(ratios.values())).keys()], ratio_rows),
    ])


def format_comparison(comparison: Comparison) -> str:
    """Every checked metric, then the verdict."""
    rows = [
        [c.result, c.kind, c.metric, f"{c.base:.4g}", f"{c.new:.4g}", _ratio(c.new, c.base),
         f"REGRESSED +{100 * c.worse_by:.1f}%" if c.regressed else "ok"]
        for c in comparison.changes
    ]
    lines = [table(["result", "kind", "metric", "base", "new", "new/base", "verdict"], rows)]
    lines += [f"{name}: in the base run, missing from the new one" for name in comparison.missing]
    regressed = sum(c.regressed for c in comparison.changes)
    lines.append(f"{'FAIL' if comparison.failed else 'PASS'}: {regressed} of {len(comparison.changes)} metrics worse by "
                 f"more than {100 * comparison.max_regression:g}%"
                 + (f", {len(comparison.missing)} results missing" if comparison.missing else ""))
    return "\n".join(lines)
