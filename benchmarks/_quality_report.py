"""The quality benchmark's outputs: markdown tables per setting (by G; quantized rows by whole-model bytes) and a
plot of memory (whole-model bytes where rows carry them, else expert memory) vs quality."""

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


# the reference of the bytes table: dense int4 of every layer, `mcsmoe compress --quantize int4`'s defaults
BYTES_REFERENCE = "dense-int4-all"


def bytes_table(rows: list[dict]) -> str:
    """The quantized rows of each setting against whole-model bytes: recipe, bytes, ratio to dense int4
    (BYTES_REFERENCE, no recovery), the metric and its change from the dense model. Empty without that row."""
    parts = []
    for setting in dict.fromkeys(row["setting"] for row in rows):
        chosen = [row for row in rows if row["setting"] == setting and "bytes" in row]
        dense = next((row for row in chosen if row["method"] == "dense" and row["distill_steps"] == 0), None)
        reference = next((row for row in chosen if row["method"] == BYTES_REFERENCE and row["distill_steps"] == 0),
                         None)
        if dense is None or reference is None:
            continue
        parts += [f"### {setting}: whole-model bytes (ratio to {BYTES_REFERENCE}, {reference['bytes']:,} B)\n",
                  f"| recipe | G | recovery steps | bytes | / dense int4 | {dense['metric']} | vs dense |",
                  "|---|---|---|---|---|---|---|"]
        for row in sorted(chosen, key=lambda row: (row["bytes"], row["distill_steps"])):
            change = 100 * (row["value"] / dense["value"] - 1)
            parts.append(f"| {method_label(row)} | {row['experts']} | {row['distill_steps']} | {row['bytes']:,} | "
                         f"{row['bytes'] / reference['bytes']:.3f} | {format_value(row['metric'], row['value'])} | "
                         f"{change:+.1f}% |")
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
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")  # one colour per method
    colours = {method: palette(i % palette.N) for i, method in enumerate(methods)}
    nudge = {method: 0.004 * (i - (len(methods) - 1) / 2) for i, method in enumerate(methods)}
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.8), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        chosen = [row for row in rows if row["setting"] == setting]
        by_bytes = all("bytes" in row for row in chosen)  # older rows carry expert memory only
        for row in chosen:
            if row["method"] == "dense":
                recovered = row["distill_steps"] > 0
                label = f"dense + {row['distill_steps']} recovery steps" if recovered else "dense"
                ax.axhline(row["value"], color="gray" if recovered else "black",
                           linestyle=":" if recovered else "--", linewidth=1, label=label)
                continue
            colour = colours[row["method"]]
            x = row["bytes"] / 1e6 if by_bytes else row["expert_memory_ratio"] + nudge[row["method"]]
            ax.scatter(
                x, row["value"], s=36, color=colour,
                facecolors=colour if row["distill_steps"] > 0 else "none", linewidths=1.4,
            )
        for method in methods:  # legend entries: one per method, plus the two marker styles
            ax.scatter([], [], color=colours[method], label=method)
        ax.scatter([], [], facecolors="none", edgecolors="gray", label="no distillation")
        ax.scatter([], [], color="gray", label="after distillation")
        ax.set_xlabel("whole model, MB" if by_bytes else "expert memory / dense")
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
