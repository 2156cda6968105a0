"""PNG plots: training curves from metrics.jsonl, and base vs MIPO on the evaluation metrics.

matplotlib is optional (`pip install 'mipo_mlx[plot]'`); without it, plots are skipped with a note.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core import reading

CURVES = [
    ("loss", "loss"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
]
COLORS = ["#888888", "#3366cc", "#cc6633", "#339966", "#9955bb"]  # base first, then each model
BARS = [
    ("accuracy", "accuracy"),
    ("compliance", "compliance"),
    ("well_formed_rate", "well-formed"),
    ("pmi_mean", "PMI (nats)"),
    ("guard_score", "valid score (guard)"),
    ("length_mean", "length (tokens)"),
    ("distinct_2", "distinct-2"),
]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: plots skipped (matplotlib not installed: pip install 'mipo_mlx[plot]')",
            file=sys.stderr,
        )
        return None
    return plt


def plot_training(metrics_path: Path, target: Path) -> Path | None:
    """Loss, reward margin and reward accuracy per step (validation points where present)."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = reading.appended_values(metrics_path, "metrics")
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (key, title) in zip(axes, CURVES):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label="train", lw=1)
        valid = [r for r in rows if f"valid/{key}" in r]
        if valid:
            ax.plot(
                [r["step"] for r in valid], [r[f"valid/{key}"] for r in valid], "o-", label="valid"
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def plot_comparison(results: dict[str, dict], target: Path) -> Path | None:
    """One panel per metric, a bar per model; PMI with its 95% interval."""
    plt = _pyplot()
    if plt is None:
        return None
    bars = [(k, t) for k, t in BARS if all(k in r for r in results.values())]
    fig, axes = plt.subplots(1, len(bars), figsize=(3.2 * len(bars), 3.2))
    names = list(results)
    for ax, (key, title) in zip(axes if len(bars) > 1 else [axes], bars):
        values = [results[n][key] for n in names]
        errors = None
        if key == "pmi_mean":
            errors = [
                [v - results[n]["pmi_ci95"][0] for v, n in zip(values, names)],
                [results[n]["pmi_ci95"][1] - v for v, n in zip(values, names)],
            ]
        ax.bar(
            names,
            values,
            yerr=errors,
            color=[COLORS[i % len(COLORS)] for i in range(len(names))],
            capsize=4,
        )
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
