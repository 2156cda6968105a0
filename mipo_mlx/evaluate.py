"""`python -m mipo_mlx.evaluate`: accuracy, PMI, length and diversity, base vs adapters.

  python -m mipo_mlx.evaluate --adapters <run-dir>                 # the run's model and held-out prompts
  python -m mipo_mlx.evaluate --model <repo-or-folder> --prompts <heldout.jsonl> [--adapters <dir>]

No fusing: adapters are attached to the base in memory. PMI is MIPO's own success
measure and needs no labels: for a policy answer y to prompt x,
  PMI(y; x) = log p_base(y | x) - mean_k log p_base(y | x'_k),  x'_k other held-out prompts,
averaged over prompts with a 95% normal interval.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cli import build_parser, parse_args
from .config import Config, resolve
from .errors import UserError, reports_user_errors
from .files import write_json, write_text
from .tasks.extract import is_correct

SHORTCUTS = {"model": "model.path", "prompts": "evaluation.prompts", "output": "output.dir",
             "limit": "evaluation.limit"}
METRICS = [("accuracy", "accuracy", "{:.3f}"), ("pmi_mean", "PMI (nats)", "{:.2f}"),
           ("length_mean", "length (tokens)", "{:.1f}"), ("distinct_2", "distinct-2", "{:.3f}"),
           ("finished_rate", "finished", "{:.3f}")]


def other_prompts(n: int, k: int, seed: int) -> np.ndarray:
    """(n, k) indices of other prompts: row i never holds i and has no repeats."""
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    draws = np.stack([rng.choice(n - 1, size=k, replace=False) for _ in range(n)])  # (n, k) in [0, n-2]
    return draws + (draws >= np.arange(n)[:, None])  # skip i itself


def pmi_scores(model, prompt_ids, response_ids, k: int, seed: int, pad: int, batch_rows: int = 32) -> np.ndarray:
    """Per-answer PMI under `model` (the base): (n,) array, one mx.eval per batch of rows."""
    import mlx.core as mx

    from .score import pack, sequence_logps

    others = other_prompts(len(prompt_ids), k, seed)
    rows = [(i, j) for i in range(len(prompt_ids)) for j in (i, *others[i])]  # (answer, prompt) pairs
    logps = np.zeros(len(rows))
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        arrays = pack([prompt_ids[j] for _, j in chunk], [response_ids[i] for i, _ in chunk], pad)
        out = sequence_logps(model, *map(mx.array, arrays))
        mx.eval(out)
        logps[start : start + len(chunk)] = np.array(out.tolist())
    logps = logps.reshape(len(prompt_ids), others.shape[1] + 1)  # (n, 1 + k)
    return logps[:, 0] - logps[:, 1:].mean(axis=1)


def distinct_n(sequences: list[list[int]], n: int) -> float:
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def interval(values: np.ndarray) -> list[float]:
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return [float(values.mean() - half), float(values.mean() + half)]


def summarize(texts, responses, labels, tasks, pmi: np.ndarray) -> dict:
    """Metrics of one model's answers; accuracy only over prompts that carry a label."""
    bodies = [r.token_ids[:-1] if r.finished else r.token_ids for r in responses]
    result = {"n": len(texts), "pmi_mean": float(pmi.mean()), "pmi_ci95": interval(pmi),
              "length_mean": float(np.mean([len(b) for b in bodies])),
              "distinct_1": distinct_n(bodies, 1), "distinct_2": distinct_n(bodies, 2),
              "finished_rate": float(np.mean([r.finished for r in responses]))}
    scored = [(t, str(a), task) for t, a, task in zip(texts, labels, tasks) if a is not None]
    if scored:
        hits = np.array([is_correct(t, a) for t, a, _ in scored], dtype=float)
        result.update(accuracy=float(hits.mean()), accuracy_ci95=interval(hits), labelled=len(scored))
        by_task: dict[str, list[float]] = {}
        for (_, _, task), hit in zip(scored, hits):
            by_task.setdefault(str(task), []).append(hit)
        if len(by_task) > 1:
            result["accuracy_by_task"] = {k: float(np.mean(v)) for k, v in sorted(by_task.items())}
    return result


def answer_and_measure(model, tokenizer, rendered, labels, tasks, config: Config, base_context, label: str) -> dict:
    """Generate the model's answers to the held-out prompts; measure them (PMI under the base)."""
    from . import generate as gen
    from .pipeline import decode, generate_all, pad_id

    ev = config.evaluation
    sampling = replace(config.generation, temperature=ev.temperature, top_p=ev.top_p,
                       max_tokens=ev.max_tokens, seed=ev.seed, truncated="keep")
    responses: list[gen.Response] = generate_all(model, tokenizer, rendered.ids,
                                                 replace(config, generation=sampling), f"answer ({label})", 0)
    with base_context():
        pmi = pmi_scores(model, rendered.ids, [r.token_ids for r in responses], ev.pmi_negatives, ev.seed,
                         pad_id(tokenizer))
    texts = [decode(tokenizer, r) for r in responses]
    result = summarize(texts, responses, labels, tasks, pmi)
    result["examples"] = [{"prompt": p.question, "answer": t} for p, t in zip(rendered.prompts[:3], texts[:3])]
    return result


def heldout(tokenizer, config: Config):
    from .pipeline import render_prompts
    from .prompts import read_prompts

    if not config.evaluation.prompts:
        raise UserError("evaluation.prompts is not set: pass --prompts <heldout.jsonl>")
    prompts = read_prompts(config.evaluation.prompts, config.evaluation.limit)
    rendered = render_prompts(prompts, tokenizer, replace(config, data=replace(config.data, prompts=config.evaluation.prompts)))
    labels = [p.extra.get("answer") for p in rendered.prompts]
    tasks = [p.extra.get("task", "all") for p in rendered.prompts]
    return rendered, labels, tasks


def markdown_table(results: dict[str, dict]) -> str:
    names = list(results)
    header = "| metric | " + " | ".join(names) + (" | change |" if len(names) == 2 else " |")
    lines = [header, "|" + " --- |" * (len(names) + 1 + (len(names) == 2))]
    for key, title, fmt in METRICS:
        if not all(key in r for r in results.values()):
            continue
        cells = [fmt.format(results[n][key]) for n in names]
        if key == "pmi_mean":
            cells = [c + " [{:.2f}, {:.2f}]".format(*results[n]["pmi_ci95"]) for c, n in zip(cells, names)]
        change = [("{:+" + fmt[2:]).format(results[names[1]][key] - results[names[0]][key])] if len(names) == 2 else []
        lines.append(f"| {title} | " + " | ".join(cells + change) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: dict[str, dict], plots: bool) -> str:
    table = markdown_table(results)
    write_json(out / "eval.json", results)
    write_text(out / "eval.md", table)
    if plots:
        from .plots import plot_comparison

        plot_comparison(results, out / "eval.png")
    return table


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m mipo_mlx.evaluate", __doc__.split("\n\n")[0], SHORTCUTS)
    parser.add_argument("--adapters", metavar="DIR", help="a run folder with adapters (its config.yaml fills the rest)")
    yaml_path, overrides, extras = parse_args(parser, argv)
    adapters = extras.get("adapters")
    if adapters and yaml_path is None and (Path(adapters) / "config.yaml").is_file():
        yaml_path = str(Path(adapters) / "config.yaml")
    config = resolve(yaml_path, overrides)
    if not config.model.path:
        raise UserError("model.path is not set: pass --model <repo-or-folder> or --adapters <run-dir>")
    from ._backend import require_mlx

    require_mlx()
    results = evaluate(config, adapters)
    out = Path(overrides.get("output.dir") or adapters or config.output.dir)
    print(write_report(out, results, config.evaluation.plots))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


def evaluate(config: Config, adapters: str | None) -> dict[str, dict]:
    """Base (and, given adapters, base + adapters) on the held-out prompts."""
    from contextlib import nullcontext

    from . import model as mdl

    model, tokenizer, _ = mdl.load(config.model)
    rendered, labels, tasks = heldout(tokenizer, config)
    results = {"base": answer_and_measure(model, tokenizer, rendered, labels, tasks, config, nullcontext, "base")}
    if adapters:
        mdl.load_adapters(model, Path(adapters))
        results["mipo"] = answer_and_measure(model, tokenizer, rendered, labels, tasks, config,
                                             lambda: mdl.adapters_disabled(model), "mipo")
    return results


if __name__ == "__main__":
    sys.exit(main())

