"""Decode latency and bytes of quantized graphs against onnxruntime-genai's builder, in one run (issue 12).

    python benchmarks/quantized_decode.py WORK_DIR [--threads 2] [--rounds 5] [--steps 32] [--prefill 512]
                                          [--only NAME ...] [--also-threads 1]
    python benchmarks/quantized_decode.py WORK_DIR --perplexity

Builds (unless present) the ~330 MB random Mixtral (hidden 512, experts of 1024, 6 layers, 8 experts
top-2, vocabulary 2048), compresses and exports it as the VARIANTS below; builds the builder's fp32
and int4 graphs; then times every contestant (or those named by --only) in alternating rounds
(batch 1) and prints decode p50 ms/token, its ratio to ours fp32 and to the builder's int4 (and the
median and range over rounds of the ratio to the builder's int4 paired by round: `_latency.round_ratios`),
and bytes on disk. Ours int4 is also timed at MatMulNBits accuracy level 0 (float32 compute; the
default is onnxruntime's level 4, int8 activations). Rows "-experts" quantize the expert projections
only (attention and LM head stay fp32); rows "-all" quantize every linear layer but the routers, as
the builder's int4 quantizes every MatMul (the embeddings stay fp32 in both); rows "-emb" also quantize
the input embeddings (`--quantize-scope all+embeddings`). --prefill N also times one prefill of an
N-token prompt per round (p50 over rounds, ratios the same way). --also-threads 1 also times every graph
with one intra-op thread (rows NAME@1t) in the same rounds: a graph of many small kernels can decode faster
on one thread than on two, the builder's few large ones cannot, and each is best compared at its best.

--perplexity instead prints held-out perplexity of the embedded model (demo.embedded_model_dir, the
evaluation of benchmarks/_quality_lm.py): dense fp32, dense int4 (scope all and experts), merged
G = E/2 int4 (scope all), in torch (the reference every exported graph matches within 1e-4).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

CONFIG = dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
              tie_word_embeddings=False)
# the "benchmark-size model of ~300M parameters": the same shape, twice as wide (~1.2 GB fp32)
CONFIG_300M = dict(CONFIG, hidden_size=1024, intermediate_size=2048, num_attention_heads=16, num_key_value_heads=4)
MODELS = {"330mb": CONFIG, "300m": CONFIG_300M}
CALIB = dict(max_calib_tokens=2048, calib_seq_len=64)
INT4 = dict(quantize="int4", quant_block=32)
# name -> ("compress", CompressionRecipe fields[, ExportConfig fields]) | ("export", ExportConfig fields)
# | None (dense as is). Exports use the default target, "ort" (fused attention and norms), unless named.
VARIANTS = {
    "ours-fp32": None,
    "ours-fp32-portable": ("export", dict(target="portable")),
    "ours-int4-experts": ("compress", dict(experts=8, quant_scope="experts", **INT4)),
    "ours-G4-int4-experts": ("compress", dict(experts=4, quant_scope="experts", **INT4)),
    "ours-G4-r0.25-int4-experts": ("compress", dict(experts=4, rank_ratio=0.25, quant_scope="experts", **INT4)),
    # the dense checkpoint quantized at export (mcsmoe-export --quantize int4): G = E groups of one expert,
    # which target ort writes as QMoE (dense int4 blocks) with the weights in external data, as by default
    "ours-int4-all": ("export", dict(quant_scope="all", **INT4)),
    # symmetric codes (no zero points): the builder's own int4 format
    "ours-int4-all-sym": ("export", dict(quant_scope="all", quant_symmetric=True, **INT4)),
    "ours-G4-int4-all": ("compress", dict(experts=4, quant_scope="all", **INT4)),
    "ours-G4-r0.25-int4-all": ("compress", dict(experts=4, rank_ratio=0.25, quant_scope="all", **INT4)),
    "ours-G4-int4-emb": ("compress", dict(experts=4, quant_scope="all+embeddings", **INT4)),
    "ours-G4-r0.25-int4-emb": ("compress", dict(experts=4, rank_ratio=0.25, quant_scope="all+embeddings", **INT4)),
    # every MoE block one com.microsoft.QMoE (dense experts only), as exported: accuracy level 0
    "ours-int4-all-qmoe": ("compress", dict(experts=8, quant_scope="all", **INT4), dict(target="ort-qmoe")),
    "ours-G4-int4-all-qmoe": ("compress", dict(experts=4, quant_scope="all", **INT4), dict(target="ort-qmoe")),
    # the experts' kernels at accuracy level 0 (float32 compute), the rest at 4: less session memory
    "ours-G4-r0.25-int4-emb-x0": ("compress", dict(experts=4, rank_ratio=0.25, quant_scope="all+embeddings", **INT4),
                                  dict(expert_accuracy_level=0)),
}
EXPORT_SUFFIXES = ("-qmoe", "-x0")  # variants that export another variant's checkpoint differently
BUILDERS = ("builder-fp32", "builder-int4")


def _bytes(path: Path) -> int:
    """Bytes of a graph file and its external data, or of a folder's model.onnx*."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("model.onnx*"))
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if ".inlined" not in p.name)


def build_all(work: Path, names: list[str], config: dict = CONFIG) -> dict[str, Path]:
    """The graph of every contestant in `names` (ONNX file, or the builder's folder), built when missing."""
    import mcsmoe_deploy as m
    from benchmarks._genai_peer import build_genai_peer
    from benchmarks._random_models import save_random_mixtral

    source = work / "mixtral"
    if not source.exists():
        save_random_mixtral(source, 0, **config)
    graphs = {}
    for name in [name for name in VARIANTS if name in names]:
        graph, how = work / f"{name}.onnx", VARIANTS[name]
        if not graph.exists():
            model_dir, options = source, {}
            if how is not None and how[0] == "export":
                options = how[1]
            elif how is not None:
                model_dir = work / next((name.removesuffix(suffix) for suffix in EXPORT_SUFFIXES
                                         if name.endswith(suffix)), name)
                options = how[2] if len(how) > 2 else {}
                if not model_dir.exists():
                    m.compress_model(source, model_dir, m.CompressionRecipe(**how[1], **CALIB), progress=False)
            m.export_model(model_dir, graph, validate=False, force=True, **options)
        graphs[name] = graph
    for name in [name for name in BUILDERS if name in names]:
        folder = work / name
        if not (folder / "model.onnx").exists():
            build_genai_peer(source, folder, name.split("-")[1])
        graphs[name] = folder
    return graphs


def perplexities(block: int = 16) -> dict[str, float]:
    """Held-out perplexity of the embedded model: dense fp32, dense int4 (scope all asymmetric and symmetric,
    experts; scope all by GPTQ), merged G = E/2 int4 scope all (round to nearest, GPTQ). Block 16: the embedded experts' intermediate size 144 is not a multiple of 32."""
    import mcsmoe_deploy as mc
    from mcsmoe_deploy.demo import EVAL_SEQ_LEN, embedded_model_dir

    model_dir = embedded_model_dir()
    dense, adapter = mc.load_model(model_dir)
    tokenizer = mc.load_tokenizer(model_dir)
    heldout = mc.token_blocks(tokenizer, mc.builtin_corpus("heldout"), EVAL_SEQ_LEN)
    spec = mc.CompressionRecipe(quantize="int4", quant_block=block).quant_spec  # the default: asymmetric
    results = {"dense fp32": mc.perplexity(dense, heldout)}
    for scope, symmetric in (("all", False), ("all", True), ("experts", False)):
        model = copy.deepcopy(dense)
        mc.group_dense_experts(model, adapter)  # as mcsmoe-export --quantize does
        mc.quantize_model(model, adapter, dataclasses.replace(spec, symmetric=symmetric), scope)
        results[f"dense int4 ({scope}{', symmetric' if symmetric else ''})"] = mc.perplexity(model, heldout)
    experts = adapter.num_experts(dense.config)
    recipe = mc.CompressionRecipe(experts=experts // 2, quantize="int4", quant_block=block)
    for name, overrides in (("dense int4 (all, gptq)", {"experts": experts, "quant_method": "gptq"}),
                            ("merged G=E/2 fp32", {"quantize": None}), ("merged G=E/2 int4 (all)", {}),
                            ("merged G=E/2 int4 (all, gptq)", {"quant_method": "gptq"})):
        source = mc.CalibratedModel(model_dir, dataclasses.replace(recipe, **overrides), progress=False)
        compressed = source.compress(in_place=True)
        source.quantize(compressed)
        results[name] = mc.perplexity(compressed.model, heldout)
    return results


def graph_perplexities(work: Path, block: int = 16) -> dict[str, float]:
    """Held-out perplexity of the embedded model's int4 graphs as onnxruntime runs them, at accuracy level 0
    (float32 compute) and 4 (int8 activations, the export's default): dense int4 (`mcsmoe-export --quantize
    int4`, experts as QMoE), merged G = E/2 int4 (QMoE) and merged + rank ratio 0.25 (MatMulNBits)."""
    import mcsmoe_deploy as mc
    from mcsmoe_deploy.demo import EVAL_SEQ_LEN, embedded_model_dir
    from mcsmoe_deploy.runtime.ort_session import OrtDecoderSession
    from scipy.special import log_softmax

    source = embedded_model_dir()
    heldout = mc.token_blocks(mc.load_tokenizer(source), mc.builtin_corpus("heldout"), EVAL_SEQ_LEN).numpy()
    dense, adapter = mc.load_model(source)
    experts = adapter.num_experts(dense.config)
    del dense
    int4 = dict(quantize="int4", quant_block=block)
    # name -> (checkpoint folder to compress into, or None: the dense model quantized at export; recipe fields)
    graphs = {"dense int4": (None, {}), "merged G=E/2 int4": (work / "emb-g", dict(experts=experts // 2)),
              "merged G=E/2 r0.25 int4": (work / "emb-gr", dict(experts=experts // 2, rank_ratio=0.25))}
    results = {}
    for name, (model_dir, recipe) in graphs.items():
        graph = work / f"emb-{''.join(c if c.isalnum() else '-' for c in name)}.onnx"
        if model_dir is not None and not model_dir.exists():
            mc.compress_model(source, model_dir, mc.CompressionRecipe(**recipe, **int4), progress=False)
        if not graph.exists():
            mc.export_model(model_dir or source, graph, validate=False, force=True, **({} if model_dir else int4))
        for level in (0, 4):
            session = OrtDecoderSession(graph, provider="cpu", matmul_accuracy_level=level)
            nll = count = 0.0
            for row in heldout:
                ids = row[None, :]
                out = session.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None, :], session.empty_past(1))
                log_probs = log_softmax(out.logits[0, :-1].astype(np.float64), axis=-1)
                nll -= log_probs[np.arange(len(row) - 1), row[1:]].sum()
                count += len(row) - 1
            results[f"{name} (onnxruntime, level {level})"] = float(np.exp(nll / count))
    return results


def time_all(graphs: dict[str, Path], threads: int, rounds: int, steps: int, prefill: int = 0, config: dict = CONFIG,
             also_threads: tuple[int, ...] = ()) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """ms per decode step of every contestant, and (prefill > 0) ms per prefill of a `prefill`-token prompt,
    alternating rounds (the same loops for all: _latency). Each of `also_threads` adds every graph once more,
    as "NAME@Nt", opened with N intra-op threads, timed in the same rounds."""
    from benchmarks._genai_peer import open_peer_lm
    from benchmarks._latency import open_ours, random_prompt, session_options, timed_rounds
    from mcsmoe_deploy.runtime.ort_session import MATMUL_ACCURACY_KEY

    c = config
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    lms = {}

    def open_graph(name: str, path: Path, options):  # a builder folder, or one of our graphs
        if path.is_dir():
            return open_peer_lm(name, path, options)
        return open_ours(name, path, c["num_hidden_layers"], c["num_key_value_heads"], head_dim, options)

    for name, path in graphs.items():
        for count in also_threads:  # the same graph served with another thread count
            lms[f"{name}@{count}t"] = open_graph(name, path, session_options(count))
        lms[name] = open_graph(name, path, session_options(threads))
        if "int4" in name and not path.is_dir():  # ours again with float32 MatMulNBits compute
            options = session_options(threads)
            options.add_session_config_entry(MATMUL_ACCURACY_KEY, "0")
            lms[name + "@acc0"] = open_graph(name, path, options)
    prompt = random_prompt(16, c["vocab_size"], 0)
    long_prompt = random_prompt(prefill, c["vocab_size"], 1) if prefill else None
    samples, prefills = timed_rounds(lms, rounds, prompt, steps, long_prompt)
    return _as_ms(samples), _as_ms(prefills)


def _as_ms(seconds: dict[str, list[float]]) -> dict[str, np.ndarray]:
    return {name: 1000 * np.asarray(values) for name, values in seconds.items() if values}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=0, metavar="N", help="also time prefill of N tokens")
    parser.add_argument("--also-threads", type=int, nargs="+", default=[], metavar="N",
                        help="also time every graph with N intra-op threads (rows NAME@Nt), in the same rounds")
    parser.add_argument("--only", nargs="+", choices=[*VARIANTS, *BUILDERS], default=None,
                        help="time these contestants only (ours-fp32 and builder-int4 are always timed: the ratios)")
    parser.add_argument("--model", choices=MODELS, default="330mb",
                        help="the random Mixtral: 330mb (hidden 512, ~80M parameters) or 300m (hidden 1024, ~300M)")
    parser.add_argument("--perplexity", action="store_true", help="print perplexities of the embedded model instead")
    parser.add_argument("--graph-perplexity", action="store_true",
                        help="print perplexities of the embedded model's int4 graphs in onnxruntime at accuracy "
                             "levels 0 and 4 instead (graphs built in WORK)")
    args = parser.parse_args(argv)
    if any(count < 1 for count in [args.threads, *args.also_threads]):
        parser.error("--threads and --also-threads take thread counts >= 1")
    if args.perplexity:
        for name, value in perplexities().items():
            print(f"{name:30s} held-out perplexity {value:8.3f}")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.graph_perplexity:
        for name, value in graph_perplexities(args.work).items():
            print(f"{name:45s} held-out perplexity {value:8.3f}")
        return
    from benchmarks._latency import describe_round_ratios, round_ratios

    names = [*VARIANTS, *BUILDERS] if args.only is None else sorted({"ours-fp32", "builder-int4", *args.only})
    graphs = build_all(args.work, names, MODELS[args.model])
    times, prefills = time_all(graphs, args.threads, args.rounds, args.steps, args.prefill, MODELS[args.model],
                               tuple(args.also_threads))
    base, peer = float(np.median(times["ours-fp32"])), float(np.median(times["builder-int4"]))
    print(f"{args.threads} threads, batch 1, {args.rounds} alternating rounds x {args.steps} decode steps, "
          f"load average {os.getloadavg()[0]:.1f}")
    paired = round_ratios(times, "builder-int4", args.rounds)
    for name, values in times.items():
        p50 = float(np.median(values))
        on_disk = _bytes(graphs[name.split("@")[0]])
        print(f"{name:32s} decode p50 {p50:7.3f} ms/token ({p50 / base:5.2f}x ours-fp32, {p50 / peer:5.2f}x "
              f"builder-int4; {describe_round_ratios(paired[name])})  "
              f"on disk {on_disk / 1e6:7.1f} MB")
    if prefills:
        base, peer = float(np.median(prefills["ours-fp32"])), float(np.median(prefills["builder-int4"]))
        for name, values in prefills.items():
            p50 = float(np.median(values))
            print(f"{name:32s} prefill-{args.prefill} p50 {p50:8.2f} ms ({p50 / base:5.2f}x ours-fp32, "
                  f"{p50 / peer:5.2f}x builder-int4)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` importable
    main()
