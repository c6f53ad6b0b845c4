"""Where one decode step's time goes: onnxruntime's session profile, per op type, of several graphs.

    python benchmarks/decode_profile.py GRAPH [GRAPH ...] [--threads 2] [--steps 64] [--prompt 16] [--top 12]
    python benchmarks/decode_profile.py GRAPH [GRAPH ...] --rounds 20   # wall time only, no profiler

Each GRAPH is one of our KV-cache graphs (`mcsmoe-export`) or a builder folder's `model.onnx`
(benchmarks/_genai_peer.py); the KV geometry is read from the graph's past inputs. For each graph:
a session with onnxruntime's profiler on (all graph optimisations, `threads` intra-op threads),
greedy decoding of `steps` tokens after a `prompt`-token prefill, then the profile's node events
of the decode steps (every run after the first) summed per op type. Printed per graph: nodes as
written and as onnxruntime's optimizer leaves them, kernel nodes run per decode step, kernel
microseconds per step, and the op types taking the most time (us per step, median over the steps;
nodes per step).

Kernel time leaves out the executor's own per-node overhead (allocation, dispatch), which grows
with the node count; wall time per step (median, profiler on) is printed beside it. The machine
may be loaded: compare the graphs of one run.

With --rounds R the profiler stays off: the graphs decode `steps` tokens each in R alternating
rounds (the loops of benchmarks/_latency) and the p50 ms per decode step is printed, with its
ratio to the LAST graph's (put the reference, e.g. the builder's, last) and the median and range of
that ratio paired by round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def _geometry(graph: Path) -> tuple[int, int, int, int]:
    """(layers, kv heads, head dim, vocabulary) read from a KV-cache graph's inputs and logits, or from
    the builder folder's genai_config.json (its graph leaves the head size symbolic)."""
    import onnx

    if (graph.parent / "genai_config.json").exists():
        from benchmarks._genai_peer import peer_geometry

        geometry, vocab = peer_geometry(graph.parent)
        return geometry.num_layers, geometry.kv_heads, geometry.head_dim, vocab
    model = onnx.load(str(graph), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    past = [n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")]
    dims = inputs[past[0]].type.tensor_type.shape.dim
    logits = next(o for o in model.graph.output if o.name == "logits").type.tensor_type.shape.dim
    return len(past), dims[1].dim_value, dims[3].dim_value, logits[-1].dim_value


def profile(graph: Path, threads: int, steps: int, prompt_length: int, work: Path) -> dict:
    """Per-op-type kernel time and node runs of the decode steps of `graph`, plus node counts and wall time."""
    import onnx

    from benchmarks._latency import decode_seconds, open_ours, random_prompt, session_options

    layers, kv_heads, head_dim, vocab = _geometry(graph)
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(work / graph.stem)
    optimized = work / f"{graph.parent.name}-{graph.stem}.optimized.onnx"
    options.optimized_model_filepath = str(optimized)
    lm = open_ours(graph.stem, graph, layers, kv_heads, head_dim, options)
    wall = decode_seconds(lm, random_prompt(prompt_length, vocab or 32, 0), steps)
    trace = json.loads(Path(lm.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")
    decode_runs = runs[1:]  # the first run is the prefill
    n = len(decode_runs)
    per_op_us: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(n))
    per_op_nodes: dict[str, int] = defaultdict(int)
    starts = np.array([r[0] for r in decode_runs])
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        index = np.searchsorted(starts, event["ts"], side="right") - 1
        if index < 0 or event["ts"] > decode_runs[index][1]:
            continue  # a prefill node
        op = event["args"].get("op_name", "?")
        per_op_us[op][index] += event["dur"]
        per_op_nodes[op] += 1
    return {
        "written": len(onnx.load(str(graph), load_external_data=False).graph.node),
        "optimized": len(onnx.load(str(optimized), load_external_data=False).graph.node),
        # median over the decode steps: a step preempted on a loaded machine does not skew it
        "us": {op: float(np.median(t)) for op, t in per_op_us.items()},
        "nodes": {op: c / n for op, c in per_op_nodes.items()},
        "wall_ms": 1000 * float(np.median(wall)),
    }


def report(name: str, result: dict, top: int) -> str:
    """A few lines: counts, totals, and the `top` op types by kernel time per decode step."""
    total_us, total_nodes = sum(result["us"].values()), sum(result["nodes"].values())
    lines = [f"== {name}: nodes {result['written']} as written, {result['optimized']} optimized; per decode step: "
             f"{total_nodes:.0f} kernel runs, {total_us:.0f} us kernel time, {result['wall_ms']:.3f} ms wall "
             f"(profiler on)"]
    for op, us in sorted(result["us"].items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"   {op:36s} {us:8.1f} us  {result['nodes'][op]:5.0f} nodes")
    return "\n".join(lines)


def wall_times(graphs: list[Path], threads: int, steps: int, prompt_length: int, rounds: int
               ) -> tuple[list[float], list[np.ndarray]]:
    """p50 ms per decode step of each graph (profiler off), timed in `rounds` alternating rounds, and each
    graph's per-round ratios to the last graph's (`_latency.round_ratios`)."""
    from benchmarks._latency import decode_seconds, open_ours, random_prompt, round_order, round_ratios, session_options

    lms, prompts = [], []
    for graph in graphs:
        layers, kv_heads, head_dim, vocab = _geometry(graph)
        lms.append(open_ours(graph.stem, graph, layers, kv_heads, head_dim, session_options(threads)))
        prompts.append(random_prompt(prompt_length, vocab or 32, 0))
    samples: list[list[float]] = [[] for _ in graphs]
    for lm, prompt in zip(lms, prompts):
        decode_seconds(lm, prompt, 4)  # warm-up
    for index in range(rounds):
        for graph in round_order(range(len(graphs)), index):
            samples[graph] += decode_seconds(lms[graph], prompts[graph], steps)
    paired = round_ratios(dict(enumerate(samples)), len(graphs) - 1, rounds)
    return [1000 * float(np.median(values)) for values in samples], [paired[i] for i in range(len(graphs))]


def _name(graph: Path) -> str:
    return graph.parent.name if graph.name == "model.onnx" else graph.stem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=0, help="time wall clock in this many alternating rounds instead")
    args = parser.parse_args(argv)
    if args.rounds:
        from benchmarks._latency import describe_round_ratios

        times, paired = wall_times(args.graphs, args.threads, args.steps, args.prompt, args.rounds)
        print(f"{args.threads} threads, batch 1, {args.rounds} alternating rounds x {args.steps} decode steps, "
              f"load average {os.getloadavg()[0]:.1f}")
        for graph, ms, ratios in zip(args.graphs, times, paired):
            ratio = f"{ms / times[-1]:5.2f}x {_name(args.graphs[-1])}; {describe_round_ratios(ratios)}"
            print(f"{_name(graph):32s} decode p50 {ms:7.3f} ms/token ({ratio})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for graph in args.graphs:
            result = profile(graph, args.threads, args.steps, args.prompt, Path(tmp))
            print(report(_name(graph), result, args.top), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` importable
    main()
