"""Choosing among k sampled answers per prompt, with no label: best-of-k by the model's own
PMI, and the majority vote of self-consistency.

- Best-of-k (pairs.samples, evaluation.best_of): keep the answer y the scoring model ranks
  highest by log p(y | x) - log p(y | x~), where x~ is x without the information MIPO
  contrasts (the user's context, or another prompt). This is the quantity MIPO maximises,
  so the choice reads no label.
- Majority vote (ScPO, Prasad et al. 2024): the final results extracted from the k answers
  vote; the chosen answer has the most common result, the rejected one the least common.

Sample j of prompt i draws from stream `stream0 + i + j * SAMPLE_STRIDE`: sample 0 is the
single answer a run without best-of-k would draw, and no sample shares a stream with another
pass (the negatives' streams start at STREAM_STRIDE).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from ..core.config import GenerationConfig
from ..data.tasks.extract import extract_letter, extract_number
from .generation import STREAM_STRIDE, Response, ResponseCache, generate_all, usable
from .scoring import response_logps

SAMPLE_STRIDE = 2 * STREAM_STRIDE


def sample_answers(
    model,
    tokenizer,
    ids: list[list[int]],
    k: int,
    config: GenerationConfig,
    stage: str,
    stream0: int = 0,
    cache: ResponseCache | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[list[Response]]:
    """k answers to each prompt, [prompt][sample]; one generation pass over the n * k rows
    (row j * n + i is sample j of prompt i, which is how `cache` keeps them)."""
    n = len(ids)
    flat = generate_all(
        model,
        tokenizer,
        [p for _ in range(k) for p in ids],
        config,
        stage,
        stream0,
        cache,
        should_stop,
        streams=[stream0 + i + j * SAMPLE_STRIDE for j in range(k) for i in range(n)],
    )
    return [[flat[j * n + i] for j in range(k)] for i in range(n)]


def pmi_of_samples(
    model,
    prompt_ids: list[list[int]],
    against_ids: list[list[int]],
    samples: list[list[Response]],
    pad: int,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """log p(y_ij | x_i) - log p(y_ij | x~_i) under `model`, (n, k), from one scoring pass."""
    n, k = len(samples), len(samples[0])
    rows = [(i, j) for i in range(n) for j in range(k)]
    answers = [samples[i][j].token_ids for i, j in rows]
    logps = response_logps(
        model,
        [prompt_ids[i] for i, _ in rows] + [against_ids[i] for i, _ in rows],
        answers + answers,
        pad,
        on_batch=on_batch,
    )
    return (logps[: len(rows)] - logps[len(rows) :]).reshape(n, k)


def best_by_pmi(pmi: np.ndarray, samples: list[list[Response]], config: GenerationConfig):
    """Each prompt's sample with the highest PMI among those the truncation rule keeps (sample
    0 when it keeps none; the first on a tie), (n,) indices."""
    picks = []
    for row, answers in zip(pmi, samples):
        kept = [j for j, answer in enumerate(answers) if usable(answer, config)]
        picks.append(max(kept, key=lambda j: (row[j], -j)) if kept else 0)
    return picks


def extract_result(text: str) -> str | None:
    """An answer's final result, read as accuracy reads it, without the label: a choice
    letter after 'the answer is', else the number after '####' or 'the answer is'."""
    return extract_letter(text) or extract_number(text)


def majority_pair(results: list[str | None], min_margin: int = 1) -> tuple[int, int] | None:
    """(chosen, rejected) sample indices by majority vote, or None.

    The results vote (an answer with no result, None, votes for None). Chosen: the first
    answer whose result has the most votes, None never being chosen; rejected: the first
    answer whose result has the fewest, among the other results. None when every answer
    agrees, or when the vote margin (chosen's votes - rejected's) is below `min_margin`."""
    votes = Counter(results)
    real = [r for r in votes if r is not None]
    if not real:
        return None
    top = min(real, key=lambda r: (-votes[r], results.index(r)))
    others = [r for r in votes if r != top]
    if not others:
        return None
    bottom = min(others, key=lambda r: (votes[r], results.index(r)))
    if votes[top] - votes[bottom] < min_margin:
        return None
    return results.index(top), results.index(bottom)
