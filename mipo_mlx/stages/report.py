"""The evaluation report: the before/after table and, after it, a few held-out prompts with
every model's answer side by side (eval.md), the results (eval.json) and the plot (eval.png),
under a name no earlier report holds."""

from __future__ import annotations

from pathlib import Path

from ..core.config import EvaluationConfig
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


def _quoted(text: str) -> list[str]:
    return [f"> {line}" if line.strip() else ">" for line in (text.splitlines() or ["(empty)"])]


def _checks(entry: dict, result: dict) -> str:
    """One answer's checks in a line: requirements met, well formed, correct, cut, PMI, KL and
    the judge's score, each where the row and the evaluation have it."""
    checks, parts = entry.get("checks", {}), []
    if "requirements" in checks:
        met = [r["met"] for r in checks["requirements"]]
        each = ", ".join(
            f"{r['kind']}{'' if r['value'] is None else ' ' + str(r['value'])}: "
            + ("yes" if r["met"] else "no")
            for r in checks["requirements"]
        )
        parts.append(f"requirements met {sum(met)}/{len(met)} ({each})")
    if "well_formed" in checks:
        parts.append("well formed" if checks["well_formed"] else "not well formed")
    if "correct" in checks:
        parts.append("correct" if checks["correct"] else "not correct")
    if entry.get("finished") is False:
        parts.append(f"cut at {entry['tokens']} tokens")
    for key, name in (("pmi", "PMI"), ("pmi_context", "context PMI"), ("kl", "KL to the base")):
        if entry.get(key) is not None:
            parts.append(f"{name} {entry[key]:.2f}")
    judged = result.get("judge_scores")
    if judged is not None and entry["row"] < len(judged):
        score = judged[entry["row"]]
        parts.append("judge " + ("n/a" if score is None else f"{score:.2f}"))
    return "; ".join(parts) or "no checks for this row"


def side_by_side_markdown(results: dict[str, dict]) -> str:
    """The held-out prompts the evaluation drew by its seed (`metrics.example_rows`), each
    with every model's answer and its checks, models in the results' order; "" when no
    result holds them (an evaluation kept from before they were)."""
    drawn = [r["side_by_side"] for r in results.values() if r.get("side_by_side")]
    if not drawn:
        return ""
    first = drawn[0]
    by_model = {
        name: {e["row"]: e for e in r.get("side_by_side", {}).get("examples", [])}
        for name, r in results.items()
    }
    shown = first["examples"]
    lines = [
        "## Answers side by side",
        "",
        f"{len(shown)} of the {first['of']} held-out prompts, drawn from evaluation.seed "
        f"({first['seed']}) alone: the same prompts for every model, never chosen for how "
        "the answers changed.",
        (
            "Requirements count as in the table (an answer that is not well formed meets none); "
            if any("requirements" in e.get("checks", {}) for e in shown)
            else ""
        )
        + "PMI and KL in nats, under the base.",
    ]
    for prompt in shown:
        row = prompt["row"]
        lines += ["", f"### Held-out prompt {row + 1} of {first['of']}", ""]
        lines += _quoted(prompt["prompt"])
        if prompt.get("context") is not None:
            lines += ["", f"context: {prompt['context']}"]
        if "label" in prompt.get("checks", {}):
            lines += ["", f"expected answer: {prompt['checks']['label']}"]
        for name, entries in by_model.items():
            entry = entries.get(row)
            if entry is None:
                lines += ["", f"**{name}**: this answer was not kept (an older evaluation)"]
                continue
            lines += ["", f"**{name}**: {_checks(entry, results[name])}", ""]
            lines += _quoted(entry["answer"])
    return "\n".join(lines) + "\n"


def asked_text(question: str, answers: dict[str, dict], config: EvaluationConfig, names) -> str:
    """`evaluation.ask`'s answers to one question, each under its model's name in `names`
    ({'base': 'base', 'mipo': 'adapters (<run>)'}), with the sampling they share."""
    lines = [
        "question:",
        *_quoted(question),
        "",
        f"sampling: the evaluation's (temperature {config.temperature}, top-p {config.top_p}, "
        f"at most {config.max_tokens} tokens, seed {config.seed}), one answer each, from the "
        "same random stream",
    ]
    for key, answer in answers.items():
        cut = "" if answer["finished"] else f", cut at {answer['tokens']} tokens"
        lines += ["", f"{names.get(key, key)}{cut}:", *_quoted(answer["answer"])]
    return "\n".join(lines)


def report_markdown(results: dict[str, dict]) -> str:
    """eval.md: the table, then the answers side by side (where the results hold them)."""
    table, section = markdown_table(results), side_by_side_markdown(results)
    return table + ("\n" + section if section else "")


def write_report(out: Path, results: dict[str, dict], plots: bool, stem: str = "eval") -> str:
    """<stem>.json, <stem>.md (and <stem>.png) in `out`; returns <stem>.md's text (the table,
    then the answers side by side)."""
    report = report_markdown(results)
    write_json(out / f"{stem}.json", results)
    write_text(out / f"{stem}.md", report)
    if plots:
        plot_comparison(results, out / f"{stem}.png")
    return report


def free_report_stem(out: Path) -> str:
    """'eval', or the first of 'eval-2', 'eval-3', ... none of whose files exist in `out`:
    a later evaluation never replaces an earlier one (a run's own report included)."""
    n = 1
    while True:
        stem = "eval" if n == 1 else f"eval-{n}"
        if not any((out / f"{stem}{ext}").exists() for ext in (".json", ".md", ".png")):
            return stem
        n += 1
