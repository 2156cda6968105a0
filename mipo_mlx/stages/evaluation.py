"""The evaluation stage: a model answers held-out prompts; accuracy, PMI, length, diversity.

PMI is MIPO's own success measure and needs no labels: for an answer y to prompt x,
  PMI(y; x) = log p_base(y | x) - mean_k log p_base(y | x'_k),  x'_k other held-out prompts,
averaged over prompts with a 95% normal interval. When every held-out prompt carries a
user context c (personalization), also the context PMI
  PMI(y; c | x) = log p_base(y | x, c) - log p_base(y | x).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from ..core.config import DataConfig, EvaluationConfig, GenerationConfig
from ..core.errors import Stopped, UserError
from ..data.prompts import (
    Prompt,
    Rendered,
    fit_length,
    messages_for,
    read_source,
    render_prompts,
    user_text,
)
from ..data.prompts import tokens as prompt_tokens
from ..engine import distributed as dist
from ..engine.generation import Response, decode, generate_all
from ..engine.lora import adapters_disabled
from ..engine.model import pad_id
from ..engine.scoring import response_logps
from ..engine.selection import best_by_pmi, pmi_of_samples, sample_answers
from .metrics import (
    answer_checks,
    answer_metrics,
    compliance_metrics,
    context_free_ids,
    example_rows,
    interval,
    other_prompts,
    pmi_scores,
    stopping,
    task_scores,
)
from .run import Run


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
    scored: dict[str, list] = {}  # per-row PMI (and KL), for the answers shown side by side
    if not lean:
        means, scored = scored_metrics(
            model, tokenizer, held, responses, config, data, base, label, adapters, should_stop
        )
        result.update(means)
    result["examples"] = [
        {"prompt": p.question, "answer": t} for p, t in zip(rendered.prompts[:3], texts[:3])
    ]
    result["answers"] = texts
    result["side_by_side"] = side_by_side(held, texts, responses, scored, config.seed)
    return result


def side_by_side(
    held: Heldout, texts: list[str], responses: list[Response], scored: dict, seed: int
) -> dict:
    """The answers the report shows beside the other models': those to `example_rows(n,
    seed)` (drawn by the seed alone, so the same prompts for every model), each with its
    checks (`answer_checks`) and its PMI, context PMI and KL where they were scored."""
    rows, prompts = example_rows(len(texts), seed), held.rendered.prompts
    shown = []
    for i in rows:
        p = prompts[i]
        entry = {"row": i, "prompt": p.question, "context": p.context, "answer": texts[i]}
        entry.update(finished=responses[i].finished, tokens=len(responses[i].token_ids))
        entry["checks"] = answer_checks(p, texts[i], held.labels[i])
        entry.update({key: values[i] for key, values in scored.items()})
        shown.append(entry)
    return {"seed": seed, "of": len(texts), "examples": shown}


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
) -> tuple[dict, dict[str, list]]:
    """PMI and context PMI under the base; with `adapters` also the KL to the base,
    log pi(y|x) - log p_base(y|x) on their own answers; and the label-free objective, the mean
    over answers of their MIPO PMI (context PMI where the prompt has a context) minus that KL:
    the KL-regularised quantity MIPO maximises, with the regulariser at full weight. Returns
    those means, and each row's values ('pmi'; 'pmi_context', None for a row without a
    context; 'kl' with `adapters`)."""
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
    per_row: dict[str, list] = {"pmi": [float(v) for v in pmi]}
    if context_pmi is not None:
        has = [p.context is not None for p in rendered.prompts]
        values = iter(context_pmi.tolist())
        per_row["pmi_context"] = [next(values) if h else None for h in has]
    if adapters:
        per_row["kl"] = [float(v) for v in kl]
    return result, per_row


def evaluate(
    run: Run, held: Heldout, adapters: bool = False, lean: bool = False, where: str = ""
) -> dict:
    """The evaluation stage: the run's model answers the held-out prompts and is measured, as
    the base or with its adapters ('mipo'; PMI is always scored by the base, with the adapters
    off). `lean` skips the scoring; `where` names the prompt set in the progress lines. A stop
    request ends it after the answer or batch in hand (`Stopped`)."""
    if not held.rendered.prompts:
        raise ValueError("no held-out prompts to evaluate on: read them with heldout()")
    model = run.model
    base = (lambda: adapters_disabled(model)) if adapters else nullcontext
    label = ("mipo" if adapters else "base") + (f", {where}" if where else "")
    c = run.config
    try:
        return answer_and_measure(
            model,
            run.tokenizer,
            held,
            c.evaluation,
            c.data,
            c.generation.batch_size,
            base,
            label,
            lean,
            adapters,
            run.stop,
        )
    except Stopped:
        raise Stopped(0, f"during the evaluation ({label})") from None


def ask(run: Run, question: str, adapters: bool = True) -> dict[str, dict]:
    """One question of the user's, through the run's templates and chat template as a held-out
    prompt, answered by the base and (with `adapters`, which run.model then holds) by the
    adapters, each with the evaluation's sampling and the same seeded stream, so only the model
    differs: {'base': ..., 'mipo': ...}, each {'answer', 'finished', 'tokens'}. Nothing is
    measured or written; a stop request ends it after the answer in hand (`Stopped`)."""
    c, where = run.config, "--ask"
    messages = messages_for(Prompt(where, question), user_text(question, None, c.data), c.data)
    ids = fit_length(prompt_tokens(run.tokenizer, messages, c.data, where), c.data, where)
    if ids is None:
        raise UserError(
            f"{where}: the question is longer than data.max_prompt_tokens="
            f"{c.data.max_prompt_tokens} tokens; shorten it or raise that setting"
        )
    how = sampling(c.evaluation, 1)
    models = {"base": adapters_disabled(run.model) if adapters else nullcontext()}
    if adapters:
        models["mipo"] = nullcontext()
    answers = {}
    for name, state in models.items():
        stage = f"answer ({name}, {where})"
        try:
            with state:
                (response,) = generate_all(
                    run.model, run.tokenizer, [ids], how, stage, 0, None, run.stop
                )
        except Stopped:
            raise Stopped(0, f"while the {name} answered --ask") from None
        answers[name] = {
            "answer": decode(run.tokenizer, response),
            "finished": response.finished,
            "tokens": len(response.token_ids),
        }
    return answers
