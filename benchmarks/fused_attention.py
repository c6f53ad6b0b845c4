"""Export target 'ort' (fused attention and norms + our MoE op) against 'portable' and the genai builder, one run.

    python benchmarks/fused_attention.py WORK_DIR [--large] [--threads 2] [--rounds 5] [--steps 32]

For the embedded model (and with --large the ~330 MB random Mixtral of quantized_decode.py) it
exports ours fp32 with target 'portable' and 'ort', builds onnxruntime-genai's fp32 graph, then:
- node counts: each graph as written, and as onnxruntime's optimizer leaves it (ORT_ENABLE_ALL,
  `optimized_model_filepath`), with the fused ops counted in the optimized graph;
- greedy tokens (batch 1, 3 prompts, 16 new tokens): 'ort' against 'portable';
- 'ort' writes a dense model's SwiGLU blocks as com.microsoft.MoE, as the builder does, so what is
  left between the two is the rest of the graph (the attention mask's nodes, the router as Gemm);
- decode p50 ms/token (batch 1, after a 16-token prompt) and prefill of a 512-token prompt (p50 of
  the rounds), timed in alternating rounds by the same loops (benchmarks/_latency), with the ratios
  to the builder's fp32 graph.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

FUSED_OPS = ("GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization",
             "SimplifiedLayerNormalization", "GroupedLowRankMoE", "MoE")


def build(work: Path, source: Path) -> dict[str, Path]:
    """Our graphs (portable, ort) and the builder's fp32 graph of the dense checkpoint `source`, built
    when missing."""
    import mcsmoe_deploy as m
    from benchmarks._genai_peer import build_genai_peer

    graphs = {}
    for target in ("portable", "ort"):
        graph = work / f"ours-{target}.onnx"
        if not graph.exists():
            m.export_model(source, graph, validate=False, force=True, target=target)
        graphs[f"ours-{target}"] = graph
    folder = work / "builder-fp32"
    if not (folder / "model.onnx").exists():
        build_genai_peer(source, folder, "fp32")
    graphs["builder-fp32"] = folder / "model.onnx"
    return graphs


def node_counts(graph: Path, work: Path) -> tuple[int, int, Counter]:
    """(nodes as written, nodes after onnxruntime's optimizer, op histogram of the optimized graph)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimized = work / f"{graph.parent.name}-{graph.stem}.optimized.onnx"
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    before = len(onnx.load(str(graph), load_external_data=False).graph.node)
    after = onnx.load(str(optimized), load_external_data=False).graph.node
    return before, len(after), Counter(node.op_type for node in after)


def open_lm(name: str, path: Path, options):
    """Our graph or the builder's as a `benchmarks._latency.ExportedLM`; the cache geometry read from the graph."""
    import onnx

    from benchmarks._genai_peer import open_peer_lm
    from benchmarks._latency import open_ours

    if name.startswith("builder"):
        return open_peer_lm(name, path.parent, options)
    inputs = {i.name: i for i in onnx.load(str(path), load_external_data=False).graph.input}
    past = [n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")]
    dims = inputs[past[0]].type.tensor_type.shape.dim
    return open_ours(name, path, len(past), dims[1].dim_value, dims[3].dim_value, options)


def measure(graphs: dict[str, Path], vocab: int, threads: int, rounds: int, steps: int, prefill: int):
    from benchmarks._latency import greedy, random_prompt, round_ratios, session_options, timed_rounds

    lms = {name: open_lm(name, path, session_options(threads)) for name, path in graphs.items()}
    prompts = [random_prompt(n, vocab, seed) for seed, n in enumerate((5, 16, 40))]
    tokens = {name: [greedy(lms[name], p, 16) for p in prompts] for name in ("ours-portable", "ours-ort")}
    short, long = random_prompt(16, vocab, 7), random_prompt(prefill, vocab, 8)
    decode, prefills = timed_rounds(lms, rounds, short, steps, long)
    paired = round_ratios(decode, "builder-fp32", rounds)
    return (tokens, {n: 1000 * np.median(v) for n, v in decode.items()},
            {n: 1000 * np.median(v) for n, v in prefills.items()}, paired)


def run(label: str, work: Path, source: Path, vocab: int, args) -> None:
    from benchmarks._latency import describe_round_ratios

    work.mkdir(parents=True, exist_ok=True)
    graphs = build(work, source)
    print(f"== {label}: {args.threads} threads, batch 1, {args.rounds} alternating rounds, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, graph in graphs.items():
        before, after, ops = node_counts(graph, work)
        fused = ", ".join(f"{op} {ops[op]}" for op in FUSED_OPS if ops[op])
        print(f"{name:14s} nodes {before:4d} as written, {after:4d} after onnxruntime's optimizer ({fused})")
    tokens, decode, prefill, paired = measure(graphs, vocab, args.threads, args.rounds, args.steps, args.prefill)
    same = tokens["ours-ort"] == tokens["ours-portable"]
    print(f"greedy tokens, 3 prompts x 16: ours-ort {'==' if same else '!='} ours-portable")
    base_d, base_p = decode["builder-fp32"], prefill["builder-fp32"]
    for name in graphs:
        print(f"{name:14s} decode p50 {decode[name]:7.3f} ms/token ({decode[name] / base_d:5.2f}x builder; "
              f"{describe_round_ratios(paired[name])})   "
              f"prefill-{args.prefill} p50 {prefill[name]:8.2f} ms ({prefill[name] / base_p:5.2f}x builder)")


def main(argv: list[str] | None = None) -> None:
    from mcsmoe_deploy.demo import embedded_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--large", action="store_true", help="also the ~330 MB random Mixtral (quantized_decode.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per round")
    parser.add_argument("--prefill", type=int, default=512, help="prompt length of the timed prefill")
    args = parser.parse_args(argv)
    run("embedded model", args.work / "embedded", Path(embedded_model_dir()), 2048, args)
    if args.large:
        from benchmarks._random_models import save_random_mixtral
        from benchmarks.quantized_decode import CONFIG

        source = args.work / "mixtral"
        if not source.exists():
            save_random_mixtral(source, 0, **CONFIG)
        run("random Mixtral (~330 MB)", args.work / "large", source, CONFIG["vocab_size"], args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` importable
    main()
