"""Latency samples of the export benchmark to percentiles, ratios, verdicts and a plain table."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mcsmoe_deploy.runtime.timing import summarize

PEERS = ("transformers",)  # dense exporters that are not ours
DENSE = ("transformers", "ours", "ort-fused")
TARGET_DENSE_OVER_PEER = 1.1  # issue 3: our dense export within 1.1x of the best dense peer
TARGET_COMPRESSED_DECODE = 0.6  # issue 3: compressed decode at most 0.6x the best dense decode


@dataclass
class Samples:
    """One contestant's samples in seconds: every decode step, one prefill per round, each round's decode median."""

    decode: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    round_decode_p50: list[float] = field(default_factory=list)


def report(samples: dict[str, Samples], exports: dict, setup: dict) -> dict:
    """Percentiles, ratios to the best dense peer (and to the best dense contestant), verdicts."""
    rows = {kind: {"decode": summarize(s.decode).to_dict(), "prefill": summarize(s.prefill).to_dict()}
            for kind, s in samples.items()}

    def best(kinds, stage):
        present = [k for k in kinds if k in rows]
        return min(present, key=lambda k: rows[k][stage]["p50_ms"]) if present else None

    result = {"setup": setup, "exports": exports, "latency": rows, "baselines": {}, "verdicts": {}}
    for stage in ("decode", "prefill"):
        peer, dense = best(PEERS, stage), best(DENSE, stage)
        result["baselines"][stage] = {"best_peer": peer, "best_dense": dense}
        for kind, row in rows.items():
            if peer:
                row[stage]["over_best_peer"] = row[stage]["p50_ms"] / rows[peer][stage]["p50_ms"]
            if dense:
                row[stage]["over_best_dense"] = row[stage]["p50_ms"] / rows[dense][stage]["p50_ms"]
    # paired ratios (step i against the peer's step i of the same round) and per-round ratios
    # show whether a verdict survives the noise
    peer = result["baselines"]["decode"]["best_peer"]
    for kind, s in samples.items():
        if peer and kind != peer:
            paired = np.array(s.decode) / np.array(samples[peer].decode)
            rows[kind]["decode"]["paired_over_best_peer"] = {
                q: round(float(np.percentile(paired, p)), 3) for q, p in (("p10", 10), ("p50", 50), ("p90", 90))
            }
            ratios = np.array(s.round_decode_p50) / np.array(samples[peer].round_decode_p50)
            rows[kind]["decode"]["over_best_peer_by_round"] = [round(float(x), 3) for x in ratios]
    for kind in ("ours", "ort-fused"):
        if kind in rows and peer:
            for stage in ("decode", "prefill"):
                ratio = rows[kind][stage].get("over_best_peer")
                result["verdicts"][f"{kind} {stage} <= {TARGET_DENSE_OVER_PEER}x best dense peer"] = (
                    ratio is not None and ratio <= TARGET_DENSE_OVER_PEER
                )
    if "compressed" in rows and result["baselines"]["decode"]["best_dense"]:
        ratio = rows["compressed"]["decode"]["over_best_dense"]
        result["verdicts"][f"compressed decode <= {TARGET_COMPRESSED_DECODE}x best dense decode"] = (
            ratio <= TARGET_COMPRESSED_DECODE
        )
    return result


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def format_table(result: dict) -> str:
    """A plain table: one row per contestant, times in ms, ratios to the best dense peer."""
    setup, rows, exports = result["setup"], result["latency"], result["exports"]
    lines = [
        f"model: {setup['model']} ({setup['parameters'] / 1e6:.0f}M parameters, "
        f"fp32 {setup['fp32_bytes'] / 1e9:.2f} GB)",
        f"onnxruntime {setup['onnxruntime']} CPU, intra_op_num_threads={setup['threads']}, ORT_ENABLE_ALL, "
        f"pool threads {'spin' if setup['spin'] else 'sleep'} when idle; "
        f"{setup['rounds']} interleaved rounds; decode: {setup['decode_steps']} steps after a "
        f"{setup['decode_prompt']}-token prompt, batch 1; prefill: {setup['prefill_tokens']} tokens, batch 1",
        f"compressed: {setup['compressed_recipe']}; load average {setup['load_before']} before, "
        f"{setup['load_after']} after; times in ms, x peer = p50 / best dense peer's p50",
        "",
        f"{'contestant':<13}{'decode p50':>11}{'p90':>9}{'x peer':>8}  {'prefill p50':>11}{'p90':>9}{'x peer':>8}"
        f"  {'export s':>9}{'peak RSS':>10}{'RSS/fp32':>9}{'on disk':>9}",
    ]
    for kind, export in exports.items():
        cells = f"{kind:<13}"
        if kind in rows:
            for stage, width in (("decode", 11), ("prefill", 11)):
                row = rows[kind][stage]
                ratio = row.get("over_best_peer", float("nan"))
                cells += f"{_ms(row['p50_ms']):>{width}}{_ms(row['p90_ms']):>9}{ratio:>8.2f}  "
        else:
            cells += f"{'(not timed: ' + (export['error'] or 'not run')[:45] + ')':<60}"
        if export["error"] is None:
            rss = export["peak_rss_bytes"]
            cells += (f"{export['seconds']:>9.1f}{rss / 2**30:>8.2f}Gi{rss / setup['fp32_bytes']:>9.2f}"
                      f"{export['file_bytes'] / 1e9:>7.2f}GB")
        lines.append(cells.rstrip())
    lines.append("")
    for stage in ("decode", "prefill"):
        base = result["baselines"][stage]
        lines.append(f"{stage}: best dense peer = {base['best_peer']}, best dense = {base['best_dense']}")
    for kind, row in rows.items():
        if "paired_over_best_peer" in row["decode"]:
            paired = row["decode"]["paired_over_best_peer"]
            lines.append(f"{kind} decode / peer: step by step p10 {paired['p10']:.2f}, p50 {paired['p50']:.2f}, "
                         f"p90 {paired['p90']:.2f}; per round {row['decode']['over_best_peer_by_round']}")
    if "compressed" in rows:
        lines.append(f"compressed decode / best dense decode: {rows['compressed']['decode']['over_best_dense']:.3f}")
    for name, ok in result["verdicts"].items():
        lines.append(f"[{'PASS' if ok else 'FAIL'}] {name}")
    return "\n".join(lines)
