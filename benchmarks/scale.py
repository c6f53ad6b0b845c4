"""Scale: a random ~1.7B-parameter bf16 Mixtral, sharded like the hub, through compress and export.

Writes the model once (seeded, tensor by tensor, with tests/hub_layout.py's shard and side-file
writers: model-0000N-of-0000M.safetensors + model.safetensors.index.json under the hub's legacy
per-expert names, about 3.4 GB), then runs each stage as the real command line in a child process:

    mcsmoe compress SRC OUT --experts 4                     (merge only)
    mcsmoe compress SRC OUT --experts 4 --rank-ratio 0.5
    mcsmoe-export OUT OUT.onnx --external-data [--dtype fp16] (each compressed checkpoint)

and reports each stage's wall time and peak RSS (the larger of the child's ru_maxrss from wait4 and
the largest VmRSS summed over the child and its own children, sampled from /proc every 0.2 s into a
trace that shows when the peak happens) against the source's bf16 bytes on disk. Targets (issue 13):
compress <= 1.3x, export <= 1.5x. Run one stage at a time: never two such jobs at once on a 24 GiB
machine. --layers N writes a smaller model of the same layer shapes (6 layers: 1.07 GB) to find where
a peak is before confirming on the full one.

    python benchmarks/scale.py [--root /tmp/mcsmoe-scale] [--stages compress-merge,...] [--layers N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # hub_layout's writers (and its conftest import)

# ~1.7B parameters: 21 layers of 8 experts (1024 -> 3072), GQA 16/4 heads, untied 32k vocabulary
CONFIG = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=21, num_attention_heads=16,
              num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
              max_position_embeddings=4096, tie_word_embeddings=False)
SHARDS = 4
CALIB_TOKENS = 2048  # short calibration: the point is memory
STAGES = {
    "compress-merge": ["compress", "{src}", "{merged}", "--experts", "4"],
    "compress-lowrank": ["compress", "{src}", "{lowrank}", "--experts", "4", "--rank-ratio", "0.5"],
    "export-merge": ["export", "{merged}", "{merged}.onnx", "--external-data"],
    "export-merge-fp16": ["export", "{merged}", "{merged}-fp16.onnx", "--external-data", "--dtype", "fp16"],
    "export-lowrank": ["export", "{lowrank}", "{lowrank}.onnx", "--external-data"],
    "export-lowrank-fp16": ["export", "{lowrank}", "{lowrank}-fp16.onnx", "--external-data", "--dtype", "fp16"],
}


def layer_tensors(layer: int, config: dict, generator) -> dict:
    """Layer `layer`'s tensors under Mixtral's hub names (block_sparse_moe.experts.N.w1/w2/w3), bf16,
    normal(0, 0.02) weights and unit norms."""
    import torch

    hidden, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    head = hidden // config["num_attention_heads"]
    kv = head * config["num_key_value_heads"]
    prefix = f"model.layers.{layer}."
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
              "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "block_sparse_moe.gate.weight": (experts, hidden)}
    for expert in range(experts):
        shapes.update({f"block_sparse_moe.experts.{expert}.w1.weight": (inter, hidden),
                       f"block_sparse_moe.experts.{expert}.w2.weight": (hidden, inter),
                       f"block_sparse_moe.experts.{expert}.w3.weight": (inter, hidden)})
    tensors = {prefix + name: random_bf16(shape, generator) for name, shape in shapes.items()}
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        tensors[prefix + norm] = torch.ones(hidden, dtype=torch.bfloat16)
    return tensors


def random_bf16(shape: tuple, generator):
    """normal(0, 0.02) values of `shape` in bf16, drawn in fp32 by `generator` (seeded)."""
    import torch

    return torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(torch.bfloat16)


def write_model(path: Path, seed: int = 0, layers: int = CONFIG["num_hidden_layers"]) -> None:
    """The seeded random model of `layers` decoder layers (CONFIG's otherwise) in hub layout at `path`
    (written to `path`.tmp and renamed)."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig

    from hub_layout import write_shards, write_side_files
    from mcsmoe_deploy.demo import embedded_model_dir

    generator = torch.Generator().manual_seed(seed)
    per_shard = -(-layers // SHARDS)

    def shards():
        for index in range(SHARDS):
            part = {}
            if index == 0:
                part["model.embed_tokens.weight"] = random_bf16((CONFIG["vocab_size"], CONFIG["hidden_size"]), generator)
            for layer in range(index * per_shard, min(layers, (index + 1) * per_shard)):
                part.update(layer_tensors(layer, CONFIG, generator))
            if index == SHARDS - 1:
                part["model.norm.weight"] = torch.ones(CONFIG["hidden_size"], dtype=torch.bfloat16)
                part["lm_head.weight"] = random_bf16((CONFIG["vocab_size"], CONFIG["hidden_size"]), generator)
            yield part

    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_shards(staging, shards(), SHARDS)
    config = MixtralConfig(**{**CONFIG, "num_hidden_layers": layers}).to_dict()
    config["architectures"] = ["MixtralForCausalLM"]
    write_side_files(staging, config, torch.bfloat16, AutoTokenizer.from_pretrained(embedded_model_dir()))
    staging.rename(path)


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files under `path` (a checkpoint folder, or an ONNX file and its data)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def tree_rss(pid: int) -> int:
    """VmRSS bytes of process `pid` and all its descendants, summed (0 once it is gone)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # exited meanwhile
            continue
    return total


def run_measured(command: list[str], log: Path) -> dict:
    """Run `command`, its output to `log`; returns wall seconds, peak RSS and the RSS trace [(seconds, bytes)]
    sampled every 0.2 s. The RSS is the child's and its own children's together (a stage may run part of
    its work in a process of its own): peak_rss is the larger of ru_maxrss (from wait4: the largest single
    process, exact) and the largest sampled sum over the process tree."""
    trace: list[tuple[float, int]] = []
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss = tree_rss(child.pid)
                if rss:
                    trace.append((round(time.perf_counter() - start, 1), rss))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    largest_process = usage.ru_maxrss * 1024
    largest_tree = max((rss for _, rss in trace), default=0)
    return {"returncode": child.returncode, "seconds": round(seconds, 1), "peak_rss": max(largest_process, largest_tree),
            "peak_process_rss": largest_process, "peak_tree_rss": largest_tree, "trace": trace}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mcsmoe-scale", help="where the model and outputs go")
    parser.add_argument("--stages", default="compress-merge,compress-lowrank,export-merge,export-lowrank",
                        help=f"comma-separated, in order, from: {', '.join(STAGES)}")
    parser.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS)
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"],
                        help="decoder layers (default %(default)s: ~1.7B parameters); fewer to iterate quickly")
    parser.add_argument("--json", default=None, help="append each stage's result to this JSON-lines file")
    parser.add_argument("--keep", action="store_true", help="keep the model and outputs (default: delete them)")
    args = parser.parse_args()

    root = Path(args.root)
    full = args.layers == CONFIG["num_hidden_layers"]
    paths = {"src": root / ("mixtral-1.7b-bf16" if full else f"mixtral-{args.layers}-layers-bf16"),
             "merged": root / "merged", "lowrank": root / "lowrank"}
    if not paths["src"].exists():
        print(f"writing {paths['src']} ...", flush=True)
        write_model(paths["src"], layers=args.layers)
    source_bytes = weight_bytes(paths["src"])
    print(f"source: {source_bytes / 1e9:.3f} GB of bf16 safetensors", flush=True)
    for stage in filter(None, args.stages.split(",")):
        words = [word.format(**paths) for word in STAGES[stage]]
        if words[0] == "compress":
            words += ["--force", "--quiet", "--max-calib-tokens", str(args.calib_tokens), "--device", "cpu"]
            command = [sys.executable, "-c", "from mcsmoe_deploy.cli import main; main()", *words]
        else:
            command = [sys.executable, "-c", "from mcsmoe_deploy.cli import main_export; main_export()",
                       *words[1:], "--force", "--quiet"]
        result = run_measured(command, root / f"{stage}.log")
        output = Path(words[2])
        result.update(stage=stage, command=" ".join(["mcsmoe" if words[0] == "compress" else "mcsmoe-export",
                                                     *words[words[0] == "export":]]),
                      source_bytes=source_bytes, output_bytes=weight_bytes(output) if result["returncode"] == 0 else None,
                      peak_over_source=round(result["peak_rss"] / source_bytes, 3))
        print(json.dumps({k: v for k, v in result.items() if k != "trace"}), flush=True)
        if result["returncode"] != 0:
            print((root / f"{stage}.log").read_text()[-3000:], file=sys.stderr)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(result) + "\n")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
