"""Noise of the LM quality rows: calibration drawn by seed, per-block scores, and their report.

Two sources of noise are measured, so that "method A beats method B" is shown rather than claimed:
- calibration: each seed draws a different random set of training blocks for the routing statistics
  (and seeds random grouping and router calibration); the spread over seeds is the method's own noise;
- evaluation: the held-out perplexity is a mean over blocks; a paired bootstrap over those blocks
  gives a 95% interval for the perplexity ratio of two methods on the same calibration seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
from torch import nn

import mcsmoe_deploy as mc
from _cloze import cloze_accuracy, cloze_items

BOOTSTRAP_SAMPLES = 2000


def calibration_sample(tokenizer, seed: int, recipe: mc.CompressionRecipe | None = None) -> torch.Tensor:
    """As many calibration blocks [N, S] as the recipe's budget, drawn at random (seeded) from the training text."""
    recipe = recipe or mc.CompressionRecipe()
    blocks = mc.token_blocks(tokenizer, mc.builtin_corpus("train"), recipe.calib_seq_len)
    count = min(len(blocks), recipe.max_calib_tokens // recipe.calib_seq_len)
    chosen = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:count]
    return blocks[chosen.sort().values]


@torch.no_grad()
def block_nll(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Mean next-token negative log-likelihood (nats) of each of `blocks` [N, S]; exp of their mean is
    `mc.perplexity` (blocks have equal length)."""
    model.eval()
    values = []
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start: start + batch_size]
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
        values += nll.mean(dim=1).tolist()
    return values


def detailed_score(tokenizer, heldout: torch.Tensor, fields: dict) -> Callable[[nn.Module], dict]:
    """A row scorer: "value" (held-out perplexity), next-word "accuracy" (benchmarks/_cloze.py),
    "block_nll" (per held-out block, rounded to 1e-5), and `fields` as they are."""
    items = cloze_items(tokenizer, mc.builtin_corpus("heldout"), mc.builtin_corpus("train"))

    def score(model: nn.Module) -> dict:
        nll = block_nll(model, heldout)
        return {"value": math.exp(sum(nll) / len(nll)), "accuracy": round(cloze_accuracy(model, items), 4),
                "block_nll": [round(v, 5) for v in nll], **fields}

    return score


def bootstrap_ratio(nll: list[float], reference: list[float], seed: int = 0) -> tuple[float, float]:
    """95% interval of perplexity(nll) / perplexity(reference) over held-out blocks resampled in pairs."""
    a, b = torch.tensor(nll, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
    picks = torch.randint(0, len(a), (BOOTSTRAP_SAMPLES, len(a)), generator=torch.Generator().manual_seed(seed))
    ratios = torch.exp(a[picks].mean(dim=1) - b[picks].mean(dim=1))
    low, high = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def _spread(values: list[float], digits: int) -> str:
    """"mean ± sd" over seeds (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def noise_report(rows: list[dict]) -> str:
    """Per setting and G: each method's perplexity and accuracy as mean ± sd over calibration seeds, its
    perplexity over dense, and on seed 0 its bootstrap 95% interval against the best method at that G."""
    parts = []
    for setting in dict.fromkeys(row["setting"] for row in rows if "calib_seed" in row):
        chosen = [row for row in rows if row["setting"] == setting and "calib_seed" in row]
        seeds = sorted({row["calib_seed"] for row in chosen})
        dense = [row for row in chosen if row["method"] == "dense" and row["distill_steps"] == 0]
        dense_ppl = statistics.mean(row["value"] for row in dense)
        parts.append(f"### {setting}: held-out perplexity and next-word accuracy, calibration seeds "
                     f"{', '.join(map(str, seeds))} (mean ± sd); dense {dense_ppl:.2f}, accuracy "
                     f"{statistics.mean(row['accuracy'] for row in dense):.3f}\n")
        for g in sorted({row["experts"] for row in chosen if row["method"] != "dense"}, reverse=True):
            at_g = [row for row in chosen if row["experts"] == g and row["method"] != "dense"]
            methods = list(dict.fromkeys(row["method"] for row in at_g))
            by_method = {m: [row for row in at_g if row["method"] == m] for m in methods}
            seed0 = {m: next((row for row in rs if row["calib_seed"] == seeds[0]), None) for m, rs in by_method.items()}
            best = min((m for m in methods if seed0[m]), key=lambda m: seed0[m]["value"])
            parts += [f"G={g} (best on seed {seeds[0]}: {best})\n",
                      "| method | perplexity | / dense | accuracy | seed-" f"{seeds[0]} ppl / {best} (95% bootstrap) |",
                      "|---|---|---|---|---|"]
            for m in sorted(methods, key=lambda m: statistics.mean(r["value"] for r in by_method[m])):
                values = [r["value"] for r in by_method[m]]
                ratio = statistics.mean(values) / dense_ppl
                interval = ""
                if seed0[m] and m != best:
                    low, high = bootstrap_ratio(seed0[m]["block_nll"], seed0[best]["block_nll"])
                    interval = f"{seed0[m]['value'] / seed0[best]['value']:.3f} [{low:.3f}, {high:.3f}]"
                parts.append(f"| {m} | {_spread(values, 2)} | {ratio:.3f} | "
                             f"{_spread([r['accuracy'] for r in by_method[m]], 3)} | {interval} |")
            parts.append("")
    return "\n".join(parts)
