"""Decode latency and bytes of quantized graphs against onnxruntime-genai's builder, in one run (issue 12).

    python benchmarks/quantized_decode.py WORK_DIR [--threads 2] [--rounds 5] [--steps 32]

Builds (unless present) the ~330 MB random Mixtral (hidden 512, experts of 1024, 6 layers, 8 experts
top-2, vocabulary 2048), compresses and exports it as: ours dense fp32, dense int4 (G = E = 8),
merged G=4 int4, merged G=4 + rank ratio 0.25 int4 (target mcsmoe); dense int4 and merged G=4 int4
also with target ort-qmoe (`-qmoe`: every MoE block one com.microsoft.QMoE, accuracy level 0, i.e.
float32 compute, as exported; `-qmoe-acc4`: the same graph with the node's accuracy_level 4, int8
activations); builds the builder's fp32 and int4 graphs; then times every contestant in alternating
rounds (batch 1) and prints decode p50 ms/token, its ratio to ours fp32, and bytes on disk. Ours
int4 (target mcsmoe) is also timed at MatMulNBits accuracy level 0 (float32 compute; the default is
onnxruntime's level 4, int8 activations). Only expert projections of ours are quantized; attention
and LM head stay fp32 (the builder's int4 quantizes every MatMul). --only NAME... times a subset
(ours-fp32 is always timed: the ratios' baseline). --blocks also times the first MoE block of each int4
graph alone (benchmarks/_moe_block.py: one token per call, float32 compute unless `acc4`), against
ours-int4's block: the MoE target's own effect, which attention and LM head in fp32 dilute above.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

CONFIG = dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
              tie_word_embeddings=False)
CALIB = dict(max_calib_tokens=2048, calib_seq_len=64)
VARIANTS = {  # name -> CompressionRecipe fields (None: the dense checkpoint as is)
    "ours-fp32": None,
    "ours-int4": dict(experts=8, quantize="int4", quant_block=32),
    "ours-G4-int4": dict(experts=4, quantize="int4", quant_block=32),
    "ours-G4-r0.25-int4": dict(experts=4, rank_ratio=0.25, quantize="int4", quant_block=32),
}
QMOE = ("ours-int4", "ours-G4-int4")  # also exported with target ort-qmoe, from the same checkpoints


def _bytes(path: Path) -> int:
    """Bytes of a graph file and its external data, or of a folder's model.onnx*."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("model.onnx*"))
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if ".inlined" not in p.name)


def _with_qmoe_accuracy(graph: Path, out: Path, level: int) -> Path:
    """A copy of a QMoE graph (one file, no external data) whose QMoE nodes have accuracy_level `level`."""
    import onnx

    if not out.exists():
        model = onnx.load(str(graph))
        for node in model.graph.node:
            for attribute in node.attribute:
                if node.op_type == "QMoE" and attribute.name == "accuracy_level":
                    attribute.i = level
        onnx.save(model, str(out))
    return out


def build_all(work: Path) -> dict[str, Path]:
    """Every contestant's graph (ONNX file, or the builder's folder), built when missing."""
    import mcsmoe_deploy as m
    from benchmarks._genai_peer import build_genai_peer
    from benchmarks._random_models import save_random_mixtral

    source = work / "mixtral"
    if not source.exists():
        save_random_mixtral(source, 0, **CONFIG)
    graphs = {}
    for name, recipe in VARIANTS.items():
        graph = work / f"{name}.onnx"
        if not graph.exists():
            model_dir = source
            if recipe is not None:
                model_dir = work / name
                if not model_dir.exists():
                    m.compress_model(source, model_dir, m.CompressionRecipe(**recipe, **CALIB), progress=False)
            m.export_model(model_dir, graph, validate=False, force=True)
        graphs[name] = graph
    for name in QMOE:
        graph = work / f"{name}-qmoe.onnx"
        if not graph.exists():
            m.export_model(work / name, graph, target="ort-qmoe", validate=False, force=True)
        graphs[f"{name}-qmoe"] = graph
        graphs[f"{name}-qmoe-acc4"] = _with_qmoe_accuracy(graph, work / f"{name}-qmoe-acc4.onnx", 4)
    for precision in ("fp32", "int4"):
        folder = work / f"builder-{precision}"
        if not (folder / "model.onnx").exists():
            build_genai_peer(source, folder, precision)
        graphs[f"builder-{precision}"] = folder
    return graphs


def time_all(graphs: dict[str, Path], threads: int, rounds: int, steps: int) -> dict[str, np.ndarray]:
    """ms per decode step of every contestant, alternating rounds (the same loop for all: _latency)."""
    from benchmarks._genai_peer import open_peer_lm
    from benchmarks._latency import decode_seconds, open_ours, random_prompt, session_options
    from mcsmoe_deploy.runtime.ort_session import MATMUL_ACCURACY_KEY

    c = CONFIG
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    lms = {}
    for name, path in graphs.items():
        if path.is_dir():
            lms[name] = open_peer_lm(name, path, session_options(threads))
            continue
        lms[name] = open_ours(name, path, c["num_hidden_layers"], c["num_key_value_heads"], head_dim,
                              session_options(threads))
        if "int4" in name and "qmoe" not in name:  # the same graph with float32 MatMulNBits compute
            options = session_options(threads)
            options.add_session_config_entry(MATMUL_ACCURACY_KEY, "0")
            lms[name + "@acc0"] = open_ours(name, path, c["num_hidden_layers"], c["num_key_value_heads"],
                                            head_dim, options)
    prompt = random_prompt(16, c["vocab_size"], 0)
    samples: dict[str, list[float]] = {name: [] for name in lms}
    for lm in lms.values():
        decode_seconds(lm, prompt, 4)  # warm-up
    for _ in range(rounds):
        for name, lm in lms.items():
            samples[name] += decode_seconds(lm, prompt, steps)
    return {name: 1000 * np.asarray(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--blocks", action="store_true", help="also time the first MoE block of the int4 graphs")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="time these contestants (and ours-fp32) only")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    graphs = build_all(args.work)
    if args.only:
        unknown = set(args.only) - set(graphs)
        if unknown:
            parser.error(f"unknown contestants {sorted(unknown)}; known: {', '.join(graphs)}")
        graphs = {name: path for name, path in graphs.items() if name == "ours-fp32" or name in args.only}
    times = time_all(graphs, args.threads, args.rounds, args.steps)
    base = float(np.median(times["ours-fp32"]))
    print(f"{args.threads} threads, batch 1, {args.rounds} alternating rounds x {args.steps} decode steps, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        p50 = float(np.median(values))
        on_disk = _bytes(graphs[name.split("@")[0]])
        print(f"{name:26s} decode p50 {p50:7.3f} ms/token ({p50 / base:5.2f}x ours-fp32)  on disk {on_disk / 1e6:7.1f} MB")
    if args.blocks:
        print_blocks(graphs, args.work, args.threads, args.rounds)


def print_blocks(graphs: dict[str, Path], work: Path, threads: int, rounds: int) -> None:
    """The first MoE block of every int4 graph of ours timed alone, one token per call (see --blocks)."""
    from benchmarks._moe_block import extract_first_block, time_blocks

    names = [n for n in graphs if n.startswith("ours-") and "int4" in n and "r0.25" not in n]
    blocks = {}
    for name in names:
        block = extract_first_block(graphs[name], work / f"block-{name}.onnx")
        blocks[name] = (block, 0)
        if "qmoe" not in name:  # MatMulNBits at onnxruntime's default, int8 activations, as -qmoe-acc4
            blocks[name + "@acc4"] = (block, 4)
    times = time_blocks(blocks, CONFIG["hidden_size"], CONFIG["num_local_experts"], threads, rounds, calls=200)
    base = float(np.median(times["ours-int4"]))
    print(f"first MoE block alone, 1 token per call, {rounds} alternating rounds x 200 calls")
    for name, values in times.items():
        p50 = float(np.median(values))
        print(f"{'block ' + name:30s} p50 {1000 * p50:8.1f} us ({p50 / base:5.2f}x ours-int4 block)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` importable
    main()
