"""The evaluation stage: a model answers held-out prompts; accuracy, PMI, length, diversity.

PMI is MIPO's own success measure and needs no labels: for an answer y to prompt x,
  PMI(y; x) = log p_base(y | x) - mean_k log p_base(y | x'_k),  x'_k other held-out prompts,
averaged over prompts with a 95% normal interval. When every held-out prompt carries a
user context c (personalization), also the context PMI
  PMI(y; c | x) = log p_base(y | x, c) - log p_base(y | x).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.config import DataConfig, EvaluationConfig, GenerationConfig
from ..core.errors import Stopped, UserError
from ..core.files import write_json, write_text
from ..data.prompts import (
    Prompt,
    Rendered,
    messages_for,
    read_source,
    render,
    render_prompts,
    user_text,
)
from ..data.tasks import requirements as req
from ..data.tasks.extract import is_correct
from ..engine import distributed as dist
from ..engine.generation import Response, decode, generate_all
from ..engine.logps import grouped_logps, prefix_reuse_works, response_logps
from ..engine.model import pad_id
from ..engine.prefix import common_prefix
from ..engine.selection import best_by_pmi, pmi_of_samples, sample_answers
from .judge import win_rate
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


@dataclass
class Heldout:
    """The held-out prompts through the chat template, with their labels and task names."""

    rendered: Rendered
    labels: list[str | None]  # the rows' 'answer', where they have one
    tasks: list[str]  # the rows' 'task', else "all"


def heldout_prompts(config: EvaluationConfig) -> list[Prompt]:
    """The held-out prompts as evaluation.* says (read before any model loads: bad input stops
    early)."""
    prompts = read_source(
        config.prompts,
        config.format,
        config.split,
        0,
        config.subset,
        config.subset_seed,
        config.limit,
    )
    if config.judge:
        for p in prompts:
            if p.context is None:
                raise UserError(
                    f"{p.where}: this row has no user context; evaluation.judge scores answers "
                    "against the stated preferences of personalization rows "
                    "(set it to null otherwise)"
                )
    return prompts


def heldout(tokenizer, prompts: list[Prompt], data: DataConfig, source: str) -> Heldout:
    rendered = render_prompts(prompts, tokenizer, data, source)
    return Heldout(
        rendered,
        [p.extra.get("answer") for p in rendered.prompts],
        [p.extra.get("task", "all") for p in rendered.prompts],
    )


def other_prompts(n: int, k: int, seed: int) -> np.ndarray:
    """(n, k) indices of other prompts: row i never holds i and has no repeats, and each
    column is a permutation, so every prompt is drawn once a column and hosts exactly k + 1
    answers (its own too), which lets the scorer run each prompt once for all of them. The
    draw: prompts in a random cyclic order, column c shifted along it by its own random
    nonzero step."""
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # position of each prompt on the cycle
    steps = rng.choice(n - 1, size=k, replace=False) + 1  # (k,) distinct, nonzero
    at = np.empty(n, dtype=np.int64)
    at[order] = np.arange(n)  # prompt at each position
    return at[(order[:, None] + steps[None, :]) % n]  # (n, k)


def pmi_scores(
    model,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    k: int,
    seed: int,
    pad: int,
    plain_ids: list[list[int] | None] | None = None,
    stage: str = "PMI",
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Per-answer PMI under `model` (the base), (n,); with `plain_ids` (each prompt without its
    user context, None for a prompt that has none) also the context PMI of the answers whose
    prompt has a context, (m,); and each answer's log-prob under its own prompt, log p(y|x),
    (n,). Every log-prob comes from one scoring pass, shown as `stage`; `should_stop` is asked
    after each batch."""
    n, others = len(response_ids), other_prompts(len(prompt_ids), k, seed)
    plain = [i for i, ids in enumerate(plain_ids or []) if ids is not None]
    with dist.progress(n * (1 + others.shape[1]) + len(plain), stage) as progress:
        update = stopping(progress.update, should_stop)
        logps = answers_under(model, prompt_ids, response_ids, others, pad, update)  # (n, 1+k)
        if not plain:
            return logps[:, 0] - logps[:, 1:].mean(axis=1), None, logps[:, 0]
        flat = response_logps(
            model,
            [plain_ids[i] for i in plain],
            [response_ids[i] for i in plain],
            pad,
            on_batch=update,
        )
    return logps[:, 0] - logps[:, 1:].mean(axis=1), logps[plain, 0] - flat, logps[:, 0]


def answers_under(model, prompt_ids, response_ids, others: np.ndarray, pad: int, on_batch):
    """log p(answer i | its own prompt, then prompt others[i, c]), (n, 1 + k). Each prompt
    hosts one answer a column (`other_prompts`), so where the model takes a prompt prefix it
    runs once for all of them; prompts sharing a long prefix (few-shot exemplars) are scored
    with that prefix run once instead."""
    n, columns = len(response_ids), [np.arange(len(prompt_ids)), *others.T]
    if n < 2 or common_prefix(prompt_ids) >= 64 or not prefix_reuse_works(model):
        flat = response_logps(
            model,
            [prompt_ids[j] for column in columns for j in column],
            list(response_ids) * len(columns),
            pad,
            on_batch=on_batch,
        )
        return flat.reshape(len(columns), n).T
    hosted = [np.argsort(column) for column in columns]  # hosted[c][j]: the answer j hosts
    grid = grouped_logps(
        model,
        prompt_ids,
        [[response_ids[i] for i in answers] for answers in hosted],
        pad,
        on_batch=on_batch,
    )  # (1 + k, n): grid[c, j] = log p(answer hosted[c][j] | prompt j)
    return np.stack([grid[c, column] for c, column in enumerate(columns)], axis=1)


def context_free_ids(
    tokenizer, rendered: Rendered, data: DataConfig
) -> list[list[int] | None] | None:
    """Each held-out prompt with a user context rendered without it (None for a prompt that
    has none); None when no prompt has a context."""
    if not any(p.context is not None for p in rendered.prompts):
        return None
    turns = [
        None if p.context is None else user_text(p.question, None, data) for p in rendered.prompts
    ]
    return [
        None
        if text is None
        else render(tokenizer, messages_for(p, text, data), data.enable_thinking)
        for p, text in zip(rendered.prompts, turns)
    ]


def compliance_metrics(prompts: list[Prompt], texts: list[str]) -> dict:
    """For held-out rows that state requirements (`tasks.requirements` rows): an item's score is
    the share of its requirements the answer meets, and an answer that is not well formed meets
    none (broken text must not pass surface checks); `compliance` is the mean item score,
    `compliance_by_kind` the share of each kind's requirements met, `well_formed_rate` the share
    of well-formed answers. {} when no row states requirements."""
    rows = [
        (i, req.requirements_from_row(p.extra), p.extra.get("topic", ""))
        for i, p in enumerate(prompts)
        if "requirements" in p.extra
    ]
    if not rows:
        return {}
    scores: list[float | None] = [None] * len(prompts)
    met: dict[str, list[float]] = {}
    formed = []
    for i, requirements, topic in rows:
        good = req.well_formed(texts[i], topic)
        verdicts = [good and r.complies(texts[i]) for r in requirements]
        scores[i] = sum(verdicts) / len(verdicts)
        formed.append(good)
        for r, verdict in zip(requirements, verdicts):
            met.setdefault(r.kind, []).append(float(verdict))
    kept = np.array([s for s in scores if s is not None])
    return {
        "compliance": float(kept.mean()),
        "compliance_ci95": interval(kept),
        "compliance_by_kind": {k: float(np.mean(met[k])) for k in req.KINDS if k in met},
        "well_formed_rate": float(np.mean(formed)),
        "compliance_scores": scores,
    }


def task_scores(texts: list[str], labels, compliance_scores) -> list[float | None]:
    """Each row's score on its own task: 1/0 for a correct answer where the row has a label,
    its compliance item score (compliance_metrics') where it states requirements, None where
    it has neither."""
    scores = compliance_scores or [None] * len(texts)
    return [
        float(is_correct(text, str(label))) if label is not None else score
        for text, label, score in zip(texts, labels, scores)
    ]


def add_compliance_win_rate(results: dict[str, dict]) -> None:
    """The adapters' win rate over the base by compliance: items where the adapters' answer
    meets at least the base's share of requirements (ties win, as the paper's judge win rate)."""
    base = results.get("base", {}).get("compliance_scores")
    for name, result in results.items():
        if name != "base" and base and result.get("compliance_scores"):
            result["compliance_win_rate"] = win_rate(result["compliance_scores"], base)


def distinct_n(sequences: list[list[int]], n: int) -> float:
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def interval(values: np.ndarray) -> list[float]:
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return [float(values.mean() - half), float(values.mean() + half)]


def answer_metrics(texts: list[str], responses: list[Response], labels, tasks) -> dict:
    """Metrics of one model's answers that need no model; accuracy only over prompts with a
    label."""
    bodies = [r.token_ids[:-1] if r.finished else r.token_ids for r in responses]
    result = {
        "n": len(texts),
        "length_mean": float(np.mean([len(b) for b in bodies])),
        "distinct_1": distinct_n(bodies, 1),
        "distinct_2": distinct_n(bodies, 2),
        "finished_rate": float(np.mean([r.finished for r in responses])),
    }
    scored = [(t, str(a), task) for t, a, task in zip(texts, labels, tasks) if a is not None]
    if scored:
        hits = np.array([is_correct(t, a) for t, a, _ in scored], dtype=float)
        result.update(
            accuracy=float(hits.mean()), accuracy_ci95=interval(hits), labelled=len(scored)
        )
        by_task: dict[str, list[float]] = {}
        for (_, _, task), hit in zip(scored, hits):
            by_task.setdefault(str(task), []).append(hit)
        if len(by_task) > 1:
            result["accuracy_by_task"] = {k: float(np.mean(v)) for k, v in sorted(by_task.items())}
    return result


def sampling(config: EvaluationConfig, batch_size: int) -> GenerationConfig:
    """How evaluation answers are sampled (the same for every model compared); cut answers are
    kept."""
    return GenerationConfig(
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
        batch_size=batch_size,
        truncated="keep",
        seed=config.seed,
    )


def stopping(on_batch: Callable[[int], None], should_stop: Callable[[], bool] | None):
    """`on_batch`, then a stop at that batch's end where `should_stop` says so."""

    def update(n: int) -> None:
        on_batch(n)
        if should_stop is not None and should_stop():
            raise Stopped(0)

    return update


def answer_and_measure(
    model,
    tokenizer,
    held: Heldout,
    config: EvaluationConfig,
    data: DataConfig,
    batch_size: int,
    base: Callable[[], AbstractContextManager],
    label: str,
    lean: bool = False,
    adapters: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """The model's answers to the held-out prompts and their metrics; PMI is scored inside
    `base()` (the model with its adapters off). `label` names the model and the prompts in the
    progress lines; `adapters` says the model holds adapters (then the KL to the base is
    scored too). `lean` skips the scoring (PMI, KL, the objective): what needs only the
    answers and the labels is kept. `should_stop` is asked after each answer and batch: where
    it says so, `Stopped` ends the evaluation."""
    rendered = held.rendered
    responses = heldout_answers(
        model, tokenizer, held, config, data, batch_size, base, label, should_stop
    )
    texts = [decode(tokenizer, r) for r in responses]
    result = answer_metrics(texts, responses, held.labels, held.tasks)
    result.update(compliance_metrics(rendered.prompts, texts))
    per_row = task_scores(texts, held.labels, result.get("compliance_scores"))
    scores = [s for s in per_row if s is not None]
    if scores:
        result["task_score"] = float(np.mean(scores))
    if not lean:
        result.update(
            scored_metrics(
                model, tokenizer, held, responses, config, data, base, label, adapters, should_stop
            )
        )
    result["examples"] = [
        {"prompt": p.question, "answer": t} for p, t in zip(rendered.prompts[:3], texts[:3])
    ]
    result["answers"] = texts
    return result


def heldout_answers(
    model,
    tokenizer,
    held: Heldout,
    config: EvaluationConfig,
    data,
    batch_size,
    base,
    label,
    should_stop=None,
) -> list[Response]:
    """One answer per held-out prompt; with evaluation.best_of = k > 1, the best of k by the
    base model's PMI (against the prompt without its context, or another prompt)."""
    rendered, how = held.rendered, sampling(config, batch_size)
    if config.best_of == 1:
        return generate_all(
            model, tokenizer, rendered.ids, how, f"answer ({label})", 0, should_stop=should_stop
        )
    k, n = config.best_of, len(rendered.ids)
    samples = sample_answers(
        model,
        tokenizer,
        rendered.ids,
        k,
        how,
        f"answer ({label}, {k} each)",
        should_stop=should_stop,
    )
    plain = context_free_ids(tokenizer, rendered, data) or [None] * n
    other = other_prompts(n, 1, config.seed)[:, 0]
    against = [ids if ids is not None else rendered.ids[j] for ids, j in zip(plain, other)]
    with base(), dist.progress(2 * k * n, f"rank best of {k} ({label})") as progress:
        pmi = pmi_of_samples(
            model,
            rendered.ids,
            against,
            samples,
            pad_id(tokenizer),
            stopping(progress.update, should_stop),
        )
    return [answers[j] for answers, j in zip(samples, best_by_pmi(pmi, samples, how))]


def scored_metrics(
    model,
    tokenizer,
    held: Heldout,
    responses,
    config: EvaluationConfig,
    data,
    base,
    label,
    adapters: bool,
    should_stop=None,
) -> dict:
    """PMI and context PMI under the base; with `adapters` also the KL to the base,
    log pi(y|x) - log p_base(y|x) on their own answers; and the label-free objective, the mean
    over answers of their MIPO PMI (context PMI where the prompt has a context) minus that KL:
    the KL-regularised quantity MIPO maximises, with the regulariser at full weight."""
    rendered, pad = held.rendered, pad_id(tokenizer)
    answers = [r.token_ids for r in responses]
    with base():
        pmi, context_pmi, own = pmi_scores(
            model,
            rendered.ids,
            answers,
            config.pmi_negatives,
            config.seed,
            pad,
            context_free_ids(tokenizer, rendered, data),
            f"PMI ({label})",
            should_stop,
        )
    kl = np.zeros(len(answers))
    if adapters:
        with dist.progress(len(answers), f"KL to the base ({label})") as progress:
            policy = response_logps(
                model, rendered.ids, answers, pad, on_batch=stopping(progress.update, should_stop)
            )
        kl = policy - own
    rows = pmi.copy()
    if context_pmi is not None:
        rows[[i for i, p in enumerate(rendered.prompts) if p.context is not None]] = context_pmi
    result = {"pmi_mean": float(pmi.mean()), "pmi_ci95": interval(pmi)}
    if context_pmi is not None:
        result.update(
            pmi_context_mean=float(context_pmi.mean()), pmi_context_ci95=interval(context_pmi)
        )
    result.update(kl_mean=float(kl.mean()), objective=float(np.mean(rows - kl)))
    return result


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
