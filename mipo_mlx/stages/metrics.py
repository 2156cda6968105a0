"""What the evaluation measures of a model's answers: accuracy, compliance, length and diversity
from the texts; PMI and context PMI under the base model.

PMI is MIPO's own success measure and needs no labels: for an answer y to prompt x,
  PMI(y; x) = log p_base(y | x) - mean_k log p_base(y | x'_k),  x'_k other held-out prompts,
averaged over prompts with a 95% normal interval. When every held-out prompt carries a
user context c (personalization), also the context PMI
  PMI(y; c | x) = log p_base(y | x, c) - log p_base(y | x)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..core.config import DataConfig
from ..core.errors import Stopped
from ..data.prompts import (
    Prompt,
    Rendered,
    messages_for,
    render,
    user_text,
)
from ..data.tasks import requirements as req
from ..data.tasks.extract import is_correct
from ..engine import distributed as dist
from ..engine.generation import Response
from ..engine.prefix import common_prefix
from ..engine.probes import prefix_reuse_works
from ..engine.scoring import grouped_logps, response_logps
from .judge import win_rate


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


SIDE_BY_SIDE = 3  # held-out prompts a report shows answered by every model


def example_rows(n: int, seed: int, k: int = SIDE_BY_SIDE) -> list[int]:
    """k of n held-out rows (all of them when n <= k), in file order: the prompts the report
    shows answered side by side. The draw reads the seed (evaluation.seed) and n only, never
    an answer, so every model compared shows the same prompts and none is picked for how its
    answers changed."""
    rng = np.random.default_rng([seed, 3])  # a stream of its own: not the PMI's other_prompts
    return sorted(rng.choice(n, size=min(k, n), replace=False).tolist())


def answer_checks(prompt: Prompt, text: str, label) -> dict:
    """What the report shows beside one answer: for a row that states requirements, each
    requirement met or not as compliance counts it (an answer that is not well formed meets
    none) and whether the answer is well formed; for a row with a label, the label and whether
    the answer is correct (accuracy's rule). {} where the row has neither."""
    checks: dict = {}
    if "requirements" in prompt.extra:
        good = req.well_formed(text, prompt.extra.get("topic", ""))
        checks["well_formed"] = good
        checks["requirements"] = [
            {"kind": r.kind, "value": r.value, "met": bool(good and r.complies(text))}
            for r in req.requirements_from_row(prompt.extra)
        ]
    if label is not None:
        checks.update(label=str(label), correct=is_correct(text, str(label)))
    return checks


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


def stopping(on_batch: Callable[[int], None], should_stop: Callable[[], bool] | None):
    """`on_batch`, then a stop at that batch's end where `should_stop` says so."""

    def update(n: int) -> None:
        on_batch(n)
        if should_stop is not None and should_stop():
            raise Stopped(0)

    return update
