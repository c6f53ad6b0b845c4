"""The quality benchmark's outputs: a markdown table per setting and a plot of expert memory vs quality."""

from __future__ import annotations

import io
from pathlib import Path

from mcsmoe_deploy.files import write_file_atomically


def method_label(row: dict) -> str:
    """"msmoe", or "mcsmoe r=0.5" for the methods swept over rank ratios."""
    return f"{row['method']} r={row['rank_ratio']:g}" if row["method"].startswith("mcsmoe") else row["method"]


def format_value(metric: str, value: float) -> str:
    return f"{value:.4f}" if metric == "accuracy" else f"{value:.2f}"


def markdown_table(rows: list[dict]) -> str:
    """One table per setting: a line per method, per G the expert memory ratio and the metric.

    A cell reads "before -> after distillation" at each distillation step count of the rows.
    """
    parts = []
    for setting in dict.fromkeys(row["setting"] for row in rows):
        chosen = [row for row in rows if row["setting"] == setting]
        dense = {row["distill_steps"]: row for row in chosen if row["method"] == "dense"}
        experts = sorted({row["experts"] for row in chosen if row["method"] != "dense"}, reverse=True)
        steps = sorted({row["distill_steps"] for row in chosen if row["method"] != "dense"})
        title = f"{setting}: {chosen[0]['metric']}"
        if dense:
            values = [format_value(row["metric"], row["value"]) for _, row in sorted(dense.items())]
            title += f" (dense {' -> '.join(values)})"
        parts.append(f"### {title}; cells: distillation steps {' -> '.join(map(str, steps))}\n")
        header = "| method |" + "".join(f" G={g} memory | G={g} |" for g in experts)
        parts += [header, "|---|" + "---|---|" * len(experts)]
        for label in dict.fromkeys(method_label(row) for row in chosen if row["method"] != "dense"):
            cells = []
            for g in experts:
                same = [row for row in chosen if method_label(row) == label and row["experts"] == g]
                by_steps = {row["distill_steps"]: row for row in same}
                memory = f"{same[0]['expert_memory_ratio']:.3f}" if same else ""
                values = " -> ".join(
                    format_value(by_steps[s]["metric"], by_steps[s]["value"]) if s in by_steps else "-" for s in steps
                )
                cells += [memory, values if same else ""]
            parts.append(f"| {label} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Expert memory ratio (x) vs quality (y), one panel per setting; None when matplotlib is missing.

    One colour per method, nudged sideways by method so that ties stay visible; hollow markers
    before distillation, filled after; a dashed line at the dense model, dotted after recovery.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return None
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] != "dense"))
    colours = {method: plt.get_cmap("tab10")(i % 10) for i, method in enumerate(methods)}
    nudge = {method: 0.004 * (i - (len(methods) - 1) / 2) for i, method in enumerate(methods)}
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.8), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        chosen = [row for row in rows if row["setting"] == setting]
        for row in chosen:
            if row["method"] == "dense":
                recovered = row["distill_steps"] > 0
                label = f"dense + {row['distill_steps']} recovery steps" if recovered else "dense"
                ax.axhline(row["value"], color="gray" if recovered else "black",
                           linestyle=":" if recovered else "--", linewidth=1, label=label)
                continue
            colour = colours[row["method"]]
            ax.scatter(
                row["expert_memory_ratio"] + nudge[row["method"]], row["value"], s=36, color=colour,
                facecolors=colour if row["distill_steps"] > 0 else "none", linewidths=1.4,
            )
        for method in methods:  # legend entries: one per method, plus the two marker styles
            ax.scatter([], [], color=colours[method], label=method)
        ax.scatter([], [], facecolors="none", edgecolors="gray", label="no distillation")
        ax.scatter([], [], color="gray", label="after distillation")
        ax.set_xlabel("expert memory / dense")
        ax.set_ylabel(chosen[0]["metric"])
        if chosen[0]["metric"] == "perplexity":
            ax.set_yscale("log")  # failed compressions reach hundreds
        ax.set_title(setting)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return write_file_atomically(path, png.getvalue())
