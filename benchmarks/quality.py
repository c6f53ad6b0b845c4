"""Quality of merging methods at equal G on the embedded Mixtral-family LM (held-out perplexity).

One routing-statistics pass; each method is applied to a fresh copy of the dense model:

    dense            the original model
    msmoe            M-SMoE: similarity groups, permutation alignment, frequency-weighted merge
    mcsmoe           M-SMoE then low-rank + sparse rows at each --rank-ratios value
    uniform          same groups, alignment, plain average
    random           random groups, alignment, frequency-weighted merge
    prune-frequency  keep the G most used experts, remove the rest
    no-permute       M-SMoE without alignment

    python benchmarks/quality.py [--experts 4 2] [--distill-steps 0 200] [--json out.json]

Rows: {"setting", "method", "experts", "rank_ratio", "distill_steps", "expert_memory_ratio", "metric", "value"}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import mcsmoe_deploy as mc
from mcsmoe_deploy.demo import EVAL_SEQ_LEN, embedded_model_dir

BASELINES = {
    "msmoe": {},
    "uniform": {"weighting": "uniform"},
    "random": {"grouping": "random"},
    "prune-frequency": {"grouping": "drop"},
    "no-permute": {"permute": False},
}


def lm_rows(
    experts_list: list[int],
    rank_ratios: list[float],
    distill_steps_list: list[int],
    sparse_keep: float,
    model_dir: str | Path | None = None,
    distill_lr: float = mc.CompressionRecipe.distill_lr,
    methods: list[str] | None = None,
) -> list[dict]:
    model_dir = model_dir or embedded_model_dir()
    dense, adapter = mc.load_model(model_dir)
    tokenizer = mc.load_tokenizer(model_dir)
    heldout = mc.token_blocks(tokenizer, mc.builtin_corpus("heldout"), EVAL_SEQ_LEN)
    base_recipe = mc.CompressionRecipe()
    calib = mc.calibration_blocks(tokenizer, base_recipe)
    stats = mc.collect_routing_stats(dense, adapter, calib, progress=False, keep_inputs=base_recipe.activation_samples)
    dense_size = mc.size_report(dense, adapter)

    def row(method: str, model, experts: int, rank_ratio: float, steps: int) -> dict:
        size = mc.size_report(model, adapter)
        return {
            "setting": "lm", "method": method, "experts": experts, "rank_ratio": rank_ratio, "distill_steps": steps,
            "expert_memory_ratio": round(size.expert_bytes / dense_size.expert_bytes, 4),
            "metric": "perplexity", "value": round(mc.perplexity(model, heldout), 4),
        }

    rows = [row("dense", dense, adapter.num_experts(dense.config), 1.0, 0)]
    runs = [(name, overrides, 1.0) for name, overrides in BASELINES.items()]
    runs += [("mcsmoe", {"rank_ratio": r, "sparse_keep": sparse_keep}, r) for r in rank_ratios]
    runs += [("mcsmoe-activation-aware", {"rank_ratio": r, "sparse_keep": sparse_keep, "activation_aware": True}, r)
             for r in rank_ratios]
    runs = [run for run in runs if methods is None or run[0] in methods]
    for experts in experts_list:
        for method, overrides, rank_ratio in runs:
            recipe = mc.CompressionRecipe(experts=experts, **overrides)
            plan = mc.plan_compression(stats, adapter.num_experts(dense.config), recipe, adapter.family)
            for steps in distill_steps_list:
                start = time.perf_counter()
                model = copy.deepcopy(dense)
                mc.apply_plan(model, adapter, plan, recipe, progress=False)
                if steps:
                    mc.distill(model, dense, adapter, calib, steps, lr=distill_lr, progress=False)
                rows.append(row(method, model, experts, rank_ratio, steps))
                print(f"{method:16s} G={experts} r={rank_ratio:<5g} distill={steps:<4d} ppl={rows[-1]['value']:8.3f} "
                      f"mem={rows[-1]['expert_memory_ratio']:.3f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4])
    parser.add_argument("--rank-ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--sparse-keep", type=float, default=0.05)
    parser.add_argument("--distill-steps", type=int, nargs="+", default=[0])
    parser.add_argument("--distill-lr", type=float, default=mc.CompressionRecipe.distill_lr)
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    parser.add_argument("--model", default=None, help="another causal-LM MoE directory (default: the embedded model)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = lm_rows(
        args.experts, args.rank_ratios, args.distill_steps, args.sparse_keep, args.model, args.distill_lr, args.methods
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
