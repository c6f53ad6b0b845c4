"""What the output refit buys each method: "<method>+refit" against "<method>" from quality.py --json rows.

For every setting, G and method that has both rows with calibration seeds: the perplexity ratio
refit / plain per seed (mean ± sd over seeds), and on the first seed the paired bootstrap 95%
interval over held-out blocks (_quality_noise.bootstrap_ratio), plus both perplexities over dense.

    python benchmarks/refit_gain.py ROWS.json [ROWS.json ...]    # prints a markdown table
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _quality_noise import bootstrap_ratio  # noqa: E402

SUFFIX = "+refit"


def refit_table(rows: list[dict]) -> str:
    """The markdown table described in the module docstring (distillation steps 0 only)."""
    seeded = [row for row in rows if "calib_seed" in row and row.get("distill_steps", 0) == 0]
    index = {(r["setting"], r["method"], r["experts"], r["calib_seed"]): r for r in seeded}
    dense = {r["setting"]: r["value"] for r in seeded if r["method"] == "dense"}
    lines = ["| setting | G | method | plain / dense | +refit / dense | refit / plain (seeds) | "
             "seed-0 refit / plain (95% bootstrap) |", "|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((s, m[: -len(SUFFIX)], g) for s, m, g, _ in index if m.endswith(SUFFIX))
    for setting, method, experts in keys:
        seeds = sorted(seed for s, m, g, seed in index if (s, m, g) == (setting, method + SUFFIX, experts)
                       and (setting, method, experts, seed) in index)
        if not seeds:
            continue
        pairs = [(index[(setting, method, experts, s)], index[(setting, method + SUFFIX, experts, s)]) for s in seeds]
        ratios = [refit["value"] / plain["value"] for plain, refit in pairs]
        spread = f"{ratios[0]:.3f}" if len(ratios) == 1 else f"{statistics.mean(ratios):.3f} ± {statistics.stdev(ratios):.3f}"
        plain0, refit0 = pairs[0]
        low, high = bootstrap_ratio(refit0["block_nll"], plain0["block_nll"])
        mean_plain = statistics.mean(p["value"] for p, _ in pairs) / dense[setting]
        mean_refit = statistics.mean(r["value"] for _, r in pairs) / dense[setting]
        lines.append(f"| {setting} | {experts} | {method} | {mean_plain:.3f} | {mean_refit:.3f} | {spread} | "
                     f"{refit0['value'] / plain0['value']:.3f} [{low:.3f}, {high:.3f}] |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    loaded = [row for path in sys.argv[1:] for row in json.loads(Path(path).read_text())]
    print(refit_table(loaded), end="")
