"""The evaluation report: the before/after table (eval.md), the results (eval.json) and the plot
(eval.png), under a name no earlier report holds."""

from __future__ import annotations

from pathlib import Path

from ..core.files import write_json, write_text
from ..data.tasks import requirements as req
from .plots import plot_comparison

METRICS = [
    ("accuracy", "accuracy", "{:.3f}"),
    ("compliance", "compliance (well-formed answers)", "{:.3f}"),
    ("compliance_win_rate", "win rate vs base by compliance (ties win)", "{:.3f}"),
    ("well_formed_rate", "well-formed", "{:.3f}"),
    ("pmi_mean", "PMI (nats)", "{:.2f}"),
    ("pmi_context_mean", "context PMI (nats)", "{:.2f}"),
    ("kl_mean", "KL to the base (nats)", "{:.2f}"),
    ("objective", "objective: PMI - KL (nats)", "{:.2f}"),
    ("guard_score", "valid score (guard)", "{:.3f}"),
    ("judge_score", "judge score (1-5)", "{:.2f}"),
    ("win_rate", "win rate vs base (ties win)", "{:.3f}"),
    ("win_rate_reference", "win rate vs reference (ties win)", "{:.3f}"),
    ("length_mean", "length (tokens)", "{:.1f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("finished_rate", "finished", "{:.3f}"),
]


def _table_rows(results: dict[str, dict]) -> tuple[list[tuple[str, str, str]], dict[str, dict]]:
    """METRICS with a row per requirement kind after 'compliance', and the results flattened
    to match ('compliance/<kind>' keys)."""
    flat = {
        name: {**r, **{f"compliance/{k}": v for k, v in r.get("compliance_by_kind", {}).items()}}
        for name, r in results.items()
    }
    kinds = [k for k in req.KINDS if any(f"compliance/{k}" in r for r in flat.values())]
    rows = []
    for key, title, fmt in METRICS:
        rows.append((key, title, fmt))
        if key == "compliance":
            rows += [(f"compliance/{k}", f"compliance: {k}", fmt) for k in kinds]
    return rows, flat


def markdown_table(results: dict[str, dict]) -> str:
    rows, results = _table_rows(results)
    names = list(results)
    header = "| metric | " + " | ".join(names) + (" | change |" if len(names) == 2 else " |")
    lines = [header, "|" + " --- |" * (len(names) + 1 + (len(names) == 2))]
    for key, title, fmt in rows:
        if not any(key in r for r in results.values()):
            continue
        cells = [
            ("n/a" if results[n][key] is None else fmt.format(results[n][key]))
            if key in results[n]
            else "-"
            for n in names
        ]
        if key in ("pmi_mean", "pmi_context_mean"):
            ci = key.replace("_mean", "_ci95")
            cells = [
                c + (" [{:.2f}, {:.2f}]".format(*results[n][ci]) if ci in results[n] else "")
                for c, n in zip(cells, names)
            ]
        both = all(results[n].get(key) is not None for n in names)
        change = (
            [
                ("{:+" + fmt[2:]).format(results[names[1]][key] - results[names[0]][key])
                if both
                else "-"
            ]
            if len(names) == 2
            else []
        )
        lines.append(f"| {title} | " + " | ".join(cells + change) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: dict[str, dict], plots: bool, stem: str = "eval") -> str:
    """<stem>.json, <stem>.md (and <stem>.png) in `out`; returns the table."""
    table = markdown_table(results)
    write_json(out / f"{stem}.json", results)
    write_text(out / f"{stem}.md", table)
    if plots:
        plot_comparison(results, out / f"{stem}.png")
    return table


def free_report_stem(out: Path) -> str:
    """'eval', or the first of 'eval-2', 'eval-3', ... none of whose files exist in `out`:
    a later evaluation never replaces an earlier one (a run's own report included)."""
    n = 1
    while True:
        stem = "eval" if n == 1 else f"eval-{n}"
        if not any((out / f"{stem}{ext}").exists() for ext in (".json", ".md", ".png")):
            return stem
        n += 1
