"""Decode and prefill latency of exported graphs on onnxruntime CPU: our exports against transformers' exporter.

Contestants, all from one seeded random Mixtral-family checkpoint (benchmarks/cache/latency-<size>/):

    transformers  transformers.exporters.OnnxExporter.export_for_generation, ort_fusions="cpu":
                  prefill.onnx + decode.onnx with KV cache (the dense peer to beat)
    ours          our dense export (target portable): one KV-cache graph, each MoE block one GroupedLowRankMoE node
    ort-fused     ours with every MoE block mapped to com.microsoft::MoE (`--target ort-fused`)
    compressed    ours on the MC-SMoE checkpoint (--experts of 8 groups, --rank-ratio, --sparse-keep)

Everything is measured in ONE run so the ratios hold on a shared machine: every session has
the same options (--threads intra-op threads, ORT_ENABLE_ALL), is warmed up, and the
contestants take turns (order rotated every round) so noise hits all alike. Decode: batch 1,
--decode-steps greedy steps after a --decode-prompt token prefill, the cache growing step by
step, each step one sample. Prefill: one --prefill-tokens prompt per contestant per round.
Exports run in child processes: wall time and the child's own peak RSS (os.wait4;
RUSAGE_CHILDREN would give the maximum over every child so far). Exports skip validation.

    python benchmarks/export_latency.py --quick                 # small model, seconds; for development
    python benchmarks/export_latency.py --check                 # greedy tokens of every graph == generate()
    python benchmarks/export_latency.py --json latency.json     # the measurement (quiet machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))  # the helpers beside this script
from _latency import (  # noqa: E402
    ExportedLM, decode_seconds, greedy, open_ours, open_transformers, prefill_seconds, random_prompt, round_order,
    session_options,
)
from _latency_export import EXPORTERS, MODEL_SIZES, ModelSize, build_model  # noqa: E402
from _latency_report import Samples, format_table, report  # noqa: E402

CACHE = Path(__file__).parent / "cache"
CHILD = Path(__file__).parent / "_latency_export.py"


@dataclass
class ChildRun:
    """One child process: exit code, wall seconds, its peak RSS (bytes) and its output's tail."""

    returncode: int
    seconds: float
    peak_rss_bytes: int
    tail: str


def run_child(command: list[str]) -> ChildRun:
    """Run `command`, reading the child's own peak RSS from the kernel when it exits."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as output:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        output.seek(0)
        tail = output.read().decode(errors="replace")[-3000:]
    return ChildRun(process.returncode, seconds, usage.ru_maxrss * 1024, tail)  # Linux: ru_maxrss in KiB


@dataclass
class ExportRecord:
    """How one contestant's export went."""

    kind: str
    source: str
    out: str
    seconds: float | None = None  # the child's wall time, imports and model loading included
    export_seconds: float | None = None  # the export call alone, as the child timed it
    peak_rss_bytes: int | None = None
    file_bytes: int | None = None
    error: str | None = None
    measured_at: str | None = None  # local time; --skip-export reports an earlier run's export


def _reported_seconds(output: str) -> float | None:
    """The export time the child printed (its JSON line; log lines may follow it on the shared stream)."""
    for line in reversed(output.splitlines()):
        if line.startswith('{"kind"'):
            return json.loads(line)["seconds"]
    return None


def _bytes_on_disk(path: Path) -> int:
    files = path.rglob("*") if path.is_dir() else [path, path.with_name(path.name + ".data")]
    return sum(f.stat().st_size for f in files if f.is_file())


@dataclass
class Workdir:
    """The cached files of one model size."""

    root: Path
    experts: int
    rank_ratio: float
    sparse_keep: float

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def compressed(self) -> Path:
        return self.root / f"compressed-e{self.experts}-r{self.rank_ratio:g}-s{self.sparse_keep:g}"

    def out(self, kind: str) -> Path:
        name = {"compressed": self.compressed.name + ".onnx"}.get(kind, f"{kind}.onnx")
        return self.root / "onnx" / (kind if kind == "transformers" else name)

    def source(self, kind: str) -> Path:
        return self.compressed if kind == "compressed" else self.model

    @property
    def records(self) -> Path:
        return self.root / "onnx" / "exports.json"


def prepare(work: Workdir, size: ModelSize, kinds: list[str], skip_export: bool, calib_tokens: int) -> dict:
    """Build (once) the model and the compressed checkpoint; export every contestant unless cached and asked to skip."""
    if not work.model.exists():
        work.root.mkdir(parents=True, exist_ok=True)
        print(f"building {work.model} ({size.parameters() / 1e6:.0f}M parameters) ...", flush=True)
        build_model(work.model, size)
    if "compressed" in kinds and not work.compressed.exists():
        print(f"compressing into {work.compressed} ...", flush=True)
        run = run_child([
            sys.executable, "-m", "mcsmoe_deploy.cli", "compress", str(work.model), str(work.compressed),
            "--experts", str(work.experts), "--rank-ratio", str(work.rank_ratio), "--sparse-keep",
            str(work.sparse_keep), "--max-calib-tokens", str(calib_tokens), "--quiet",
        ])
        if run.returncode:
            sys.exit(f"compress failed:\n{run.tail}")
    records = json.loads(work.records.read_text()) if work.records.exists() else {}
    (work.root / "onnx").mkdir(exist_ok=True)
    for kind in kinds:
        out = work.out(kind)
        if skip_export and kind in records and records[kind]["error"] is None and out.exists():
            continue
        print(f"exporting {kind} ...", flush=True)
        run = run_child([sys.executable, str(CHILD), kind, str(work.source(kind)), str(out)])
        record = ExportRecord(kind, str(work.source(kind)), str(out))
        if run.returncode:
            record.error = run.tail.strip().splitlines()[-1] if run.tail.strip() else f"exit {run.returncode}"
            print(f"  {kind} export failed: {record.error}", flush=True)
        else:
            record.seconds, record.peak_rss_bytes = run.seconds, run.peak_rss_bytes
            record.export_seconds = _reported_seconds(run.tail)
            record.file_bytes = _bytes_on_disk(out)
        record.measured_at = time.strftime("%Y-%m-%d %H:%M:%S")
        records[kind] = asdict(record)
        work.records.write_text(json.dumps(records, indent=2) + "\n")
    return {kind: records[kind] for kind in kinds}


def open_contestant(kind: str, work: Workdir, size: ModelSize, options: ort.SessionOptions) -> ExportedLM:
    if kind == "transformers":
        return open_transformers(kind, work.out(kind), options)
    return open_ours(kind, work.out(kind), size.layers, size.kv_heads, size.head_dim, options)


def check_greedy(lms: dict[str, ExportedLM], work: Workdir, new_tokens: int = 16, prompts: int = 3) -> dict:
    """Each graph's greedy tokens against transformers' generate() on the model it came from."""
    import torch
    from transformers import AutoModelForCausalLM

    from mcsmoe_deploy.checkpoint import load_compressed

    references = {"dense": AutoModelForCausalLM.from_pretrained(work.model, dtype=torch.float32).eval()}
    if "compressed" in lms:
        references["compressed"] = load_compressed(work.compressed).eval()
    results = {}
    for kind, lm in lms.items():
        model = references["compressed" if kind == "compressed" else "dense"]
        model.generation_config.eos_token_id = None  # run all new_tokens steps, as the graphs do
        same = []
        for seed in range(prompts):
            prompt = random_prompt(5 + 4 * seed, model.config.vocab_size, seed)
            ids = torch.from_numpy(prompt)
            with torch.no_grad():
                want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      do_sample=False)[0, prompt.shape[1]:].tolist()
            same.append(greedy(lm, prompt, new_tokens) == want)
        results[kind] = all(same)
        print(f"  {kind:12s} greedy == generate() on {prompts} prompts x {new_tokens} tokens: {all(same)}")
    return results


def measure(lms: dict[str, ExportedLM], vocab: int, rounds: int, steps: int, decode_prompt: int,
            prefill_tokens: int, warmup: int) -> dict[str, Samples]:
    """Interleaved timing, round by round, the contestants' order rotated every round.

    In a round every contestant in turn prefills the short prompt (untimed) and takes its
    decode steps, then every contestant prefills the long prompt once. Decode steps are not
    interleaved one by one: onnxruntime's idle pool threads spin for a while after a run
    (`session.intra_op.allow_spinning`, on by default), and on 2 cores the previous session's
    spinning threads doubled the next session's step time (measured: 66 vs 32 ms).
    """
    short = random_prompt(decode_prompt, vocab, seed=1)
    long = random_prompt(prefill_tokens, vocab, seed=2)
    for lm in lms.values():
        for _ in range(warmup):
            prefill_seconds(lm, long)
            decode_seconds(lm, short, min(steps, 4))
    samples = {kind: Samples() for kind in lms}
    kinds = list(lms)
    for r in range(rounds):
        order = round_order(kinds, r)
        for kind in order:
            round_samples = decode_seconds(lms[kind], short, steps)
            samples[kind].decode += round_samples
            samples[kind].round_decode_p50.append(float(np.median(round_samples)))
        for kind in order:
            samples[kind].prefill.append(prefill_seconds(lms[kind], long))
        print(f"  round {r + 1}/{rounds} done", flush=True)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few iterations (development)")
    parser.add_argument("--check", action="store_true",
                        help="only check greedy tokens of every graph against generate() (tiny model)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=None,
                        help="bench (default), small (--quick's), tiny (--check's)")
    parser.add_argument("--contestants", default=",".join(EXPORTERS), help=f"subset of {','.join(EXPORTERS)}")
    parser.add_argument("--skip-export", action="store_true", help="reuse the cached ONNX files and export records")
    parser.add_argument("--export-only", action="store_true", help="build, compress and export, then stop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-spin", action="store_true",
                        help="idle onnxruntime pool threads sleep instead of spinning (all contestants)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 8; --quick 2)")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per round (32; --quick 8)")
    parser.add_argument("--decode-prompt", type=int, default=None, help="prompt before decoding (64; --quick 16)")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="prefill prompt length (512; --quick 128)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed prefill + decode runs per contestant")
    parser.add_argument("--experts", type=int, default=4, help="groups per layer of the compressed model (of 8)")
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--sparse-keep", type=float, default=0.0, help="structured-sparse rows kept (recipe default 0)")
    parser.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens for compressing")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    size_name = args.model_size or ("tiny" if args.check else "small" if args.quick else "bench")
    size = MODEL_SIZES[size_name]
    quick = args.quick or args.check
    rounds = args.rounds or (2 if quick else 8)
    steps = args.decode_steps or (8 if quick else 32)
    decode_prompt = args.decode_prompt or (16 if quick else 64)
    prefill_tokens = args.prefill_tokens or (128 if quick else 512)
    kinds = [k.strip() for k in args.contestants.split(",") if k.strip()]
    unknown = set(kinds) - set(EXPORTERS)
    if unknown:
        parser.error(f"unknown contestants {sorted(unknown)}")

    work = Workdir(CACHE / f"latency-{size_name}", args.experts, args.rank_ratio, args.sparse_keep)
    exports = prepare(work, size, kinds, args.skip_export, args.calib_tokens)
    if args.export_only:
        print(json.dumps(exports, indent=2))
        return
    ready = [k for k in kinds if exports[k]["error"] is None]
    options = session_options(args.threads, spin=not args.no_spin)
    lms = {kind: open_contestant(kind, work, size, options) for kind in ready}
    if args.check:
        ok = check_greedy(lms, work)
        sys.exit(0 if all(ok.values()) else 1)

    setup = {
        "model": str(work.model), "model_size": size_name, "shape": asdict(size), "parameters": size.parameters(),
        "fp32_bytes": sum(f.stat().st_size for f in work.model.glob("*.safetensors")),
        "compressed_recipe": f"experts={args.experts} of {size.experts}, rank_ratio={args.rank_ratio}, "
                             f"sparse_keep={args.sparse_keep}",
        "onnxruntime": ort.__version__, "threads": args.threads, "spin": not args.no_spin,
        "rounds": rounds, "decode_steps": steps, "decode_prompt": decode_prompt, "prefill_tokens": prefill_tokens,
        "warmup": args.warmup, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load_before": round(os.getloadavg()[0], 2),
    }
    print(f"timing {', '.join(lms)} ...", flush=True)
    samples = measure(lms, size.vocab, rounds, steps, decode_prompt, prefill_tokens, args.warmup)
    setup["load_after"] = round(os.getloadavg()[0], 2)
    result = report(samples, exports, setup)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
