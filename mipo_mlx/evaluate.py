"""`python -m mipo_mlx.evaluate`: accuracy, PMI, length and diversity, base vs adapters.

  python -m mipo_mlx.evaluate --adapters <run-dir>                 # the run's model and held-out prompts
  python -m mipo_mlx.evaluate --model <repo-or-folder> --prompts <heldout.jsonl> [--adapters <dir>]

No fusing: adapters are attached to the base in memory. PMI is MIPO's own success
measure and needs no labels: for a policy answer y to prompt x,
  PMI(y; x) = log p_base(y | x) - mean_k log p_base(y | x'_k),  x'_k other held-out prompts,
averaged over prompts with a 95% normal interval. When every held-out prompt carries a
user context c (personalization), also the no-context PMI
  PMI(y; c | x) = log p_base(y | x, c) - log p_base(y | x),
and, with evaluation.judge set, a judge model's 1-5 score per stated preference
(averaged per item) and the win rate of the adapters' answers against the base
model's answers (an item is won when its score is at least the base's: ties win);
rows with a `reference` response also get the win rate against it.
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
           ("pmi_context_mean", "no-context PMI (nats)", "{:.2f}"), ("judge_score", "judge score (1-5)", "{:.2f}"),
           ("win_rate", "win rate vs base (ties win)", "{:.3f}"),
           ("win_rate_reference", "win rate vs reference (ties win)", "{:.3f}"),
           ("length_mean", "length (tokens)", "{:.1f}"), ("distinct_2", "distinct-2", "{:.3f}"),
           ("finished_rate", "finished", "{:.3f}")]


def other_prompts(n: int, k: int, seed: int) -> np.ndarray:
    """(n, k) indices of other prompts: row i never holds i and has no repeats."""
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    draws = np.stack([rng.choice(n - 1, size=k, replace=False) for _ in range(n)])  # (n, k) in [0, n-2]
    return draws + (draws >= np.arange(n)[:, None])  # skip i itself


def pmi_columns(prompt_ids: list[list[int]], k: int, seed: int) -> list[list[list[int]]]:
    """The prompts each answer is scored under for its PMI: column 0 its own, then k others."""
    others = other_prompts(len(prompt_ids), k, seed)
    return [list(prompt_ids)] + [[prompt_ids[j] for j in others[:, c]] for c in range(others.shape[1])]


def column_logps(model, columns: list[list[list[int]]], response_ids, pad: int) -> np.ndarray:
    """(n, len(columns)): log p(response_i | columns[c][i]) under `model`, all in one scoring pass."""
    from .score import response_logps

    flat = response_logps(model, [p for column in columns for p in column], list(response_ids) * len(columns), pad)
    return flat.reshape(len(columns), len(response_ids)).T


def pmi_scores(model, prompt_ids, response_ids, k: int, seed: int, pad: int) -> np.ndarray:
    """Per-answer PMI under `model` (the base): (n,) array."""
    logps = column_logps(model, pmi_columns(prompt_ids, k, seed), response_ids, pad)  # (n, 1 + k)
    return logps[:, 0] - logps[:, 1:].mean(axis=1)


def context_free_ids(tokenizer, rendered, config: Config) -> list[list[int]] | None:
    """Each held-out prompt rendered without its user context; None unless every one has a context."""
    from .prompts import messages_for, render, user_text

    if not rendered.prompts or any(p.context is None for p in rendered.prompts):
        return None
    return [render(tokenizer, messages_for(p, user_text(p.question, None, config.data), config.data),
                   config.data.enable_thinking) for p in rendered.prompts]


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
    answers = [r.token_ids for r in responses]
    plain = context_free_ids(tokenizer, rendered, config)
    columns = pmi_columns(rendered.ids, ev.pmi_negatives, ev.seed)
    with base_context():  # own prompt, k others, and (personalization) the prompt without its context
        logps = column_logps(model, columns + ([plain] if plain is not None else []), answers, pad_id(tokenizer))
    pmi = logps[:, 0] - logps[:, 1 : len(columns)].mean(axis=1)
    if plain is not None:
        context_pmi = logps[:, 0] - logps[:, -1]
    texts = [decode(tokenizer, r) for r in responses]
    result = summarize(texts, responses, labels, tasks, pmi)
    if plain is not None:
        result.update(pmi_context_mean=float(context_pmi.mean()), pmi_context_ci95=interval(context_pmi))
    result["examples"] = [{"prompt": p.question, "answer": t} for p, t in zip(rendered.prompts[:3], texts[:3])]
    result["answers"] = texts
    return result


def add_judge(results: dict[str, dict], rendered, config: Config) -> None:
    """With evaluation.judge: judge every model's answers (and the rows' reference responses);
    add judge_score, unparsed and per-item scores to each, and the win rates (ties win)."""
    from . import judge as jd
    from . import model as mdl
    from .config import ModelConfig

    ev = config.evaluation
    if not ev.judge:
        return
    judge, tokenizer, _ = mdl.load(ModelConfig(path=ev.judge, trust_remote_code=config.model.trust_remote_code))
    prompts = rendered.prompts

    def scores(answers: list[str]) -> list[jd.ItemScore]:
        items = [jd.JudgeItem(p.question, p.context, a) for p, a in zip(prompts, answers)]
        return jd.score_response(judge, tokenizer, items, ev.judge_max_tokens, ev.judge_batch_size)

    judged = {name: scores(result["answers"]) for name, result in results.items()}
    references = [p.extra.get("reference") for p in prompts]
    reference = scores(references) if all(isinstance(r, str) and r.strip() for r in references) else None
    for name, items in judged.items():
        summary = jd.summarize(items, reference)
        results[name].update(judge_score=_known(summary["judge_score"]), judge_unparsed=summary["unparsed"],
                             judge_scores=[item.score for item in items])
        if reference is not None:
            results[name]["win_rate_reference"] = _known(summary["win_rate"])
    if "base" in judged and len(judged) > 1:
        base = [item.score for item in judged["base"]]
        for name, items in judged.items():
            if name != "base":
                results[name]["win_rate"] = _known(jd.win_rate([item.score for item in items], base))


def _known(value: float) -> float | None:
    """nan (no judge answer parsed) as None: JSON has no nan."""
    return None if math.isnan(value) else value


def heldout_prompts(config: Config):
    """The held-out prompts as evaluation.* says (read before any model loads: bad input stops early)."""
    from .prompts import read_source

    ev = config.evaluation
    if not ev.prompts:
        raise UserError("evaluation.prompts is not set: pass --prompts <heldout.jsonl>")
    prompts = read_source(ev.prompts, ev.format, ev.split, 0, ev.subset, ev.subset_seed, ev.limit)
    if ev.judge and any(p.context is None for p in prompts):
        line = next(p.line for p in prompts if p.context is None)
        raise UserError(f"{ev.prompts}: row {line} has no user context; evaluation.judge scores answers "
                        "against the stated preferences of personalization rows (set it to null otherwise)")
    return prompts


def heldout(tokenizer, config: Config, prompts):
    """The held-out prompts (from `heldout_prompts`) rendered, with their labels and tasks."""
    from .pipeline import render_prompts

    rendered = render_prompts(prompts, tokenizer, replace(config, data=replace(config.data, prompts=config.evaluation.prompts)))
    labels = [p.extra.get("answer") for p in rendered.prompts]
    tasks = [p.extra.get("task", "all") for p in rendered.prompts]
    return rendered, labels, tasks


def markdown_table(results: dict[str, dict]) -> str:
    names = list(results)
    header = "| metric | " + " | ".join(names) + (" | change |" if len(names) == 2 else " |")
    lines = [header, "|" + " --- |" * (len(names) + 1 + (len(names) == 2))]
    for key, title, fmt in METRICS:
        if not any(key in r for r in results.values()):
            continue
        cells = [("n/a" if results[n][key] is None else fmt.format(results[n][key])) if key in results[n] else "-"
                 for n in names]
        if key in ("pmi_mean", "pmi_context_mean"):
            ci = key.replace("_mean", "_ci95")
            cells = [c + (" [{:.2f}, {:.2f}]".format(*results[n][ci]) if ci in results[n] else "")
                     for c, n in zip(cells, names)]
        both = all(results[n].get(key) is not None for n in names)
        change = ([("{:+" + fmt[2:]).format(results[names[1]][key] - results[names[0]][key]) if both else "-"]
                  if len(names) == 2 else [])
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

    prompts = heldout_prompts(config)
    model, tokenizer, _ = mdl.load(config.model)
    rendered, labels, tasks = heldout(tokenizer, config, prompts)
    results = {"base": answer_and_measure(model, tokenizer, rendered, labels, tasks, config, nullcontext, "base")}
    if adapters:
        mdl.load_adapters(model, Path(adapters))
        results["mipo"] = answer_and_measure(model, tokenizer, rendered, labels, tasks, config,
                                             lambda: mdl.adapters_disabled(model), "mipo")
    add_judge(results, rendered, config)
    return results


if __name__ == "__main__":
    sys.exit(main())

