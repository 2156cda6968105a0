"""The chosen side of the pairs: the model's answer to each prompt, or with pairs.samples = k > 1
the best of k by its own PMI; and the derangement that pairs each prompt with another."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..core.config import DataConfig, GenerationConfig, PairsConfig
from ..core.errors import UserError
from ..data.prompts import Rendered, messages_for, render, user_text
from ..engine import distributed as dist
from ..engine.generation import (
    Response,
    ResponseCache,
    generate_all,
)
from ..engine.model import pad_id
from ..engine.selection import (
    best_by_pmi,
    pmi_of_samples,
    sample_answers,
)


def check_derangeable(groups: list) -> None:
    """A derangement avoiding equal groups exists iff no group holds more than half the items."""
    n = len(groups)
    if n < 2:
        raise UserError(f"{n} prompt(s): a random negative needs at least 2 different prompts")
    largest = max(Counter(groups).values())
    if largest > n - largest:
        raise UserError(
            f"{largest} of {n} prompts are identical: no derangement exists; "
            "remove duplicates or add more different prompts"
        )


def derangement(groups: list, seed: int) -> list[int]:
    """A random permutation p with groups[p[i]] != groups[i] for every i.

    `groups` is what must differ (the prompt text): so no prompt gets its own
    answer, nor the answer to a duplicate of itself, as its negative. Random
    permutations are drawn until one fits (about e draws when all differ); a
    repair pass by swaps handles sets with many duplicates.
    """
    check_derangeable(groups)
    n = len(groups)
    rng = np.random.default_rng(seed)
    for _ in range(100):
        p = rng.permutation(n)
        if all(groups[p[i]] != groups[i] for i in range(n)):
            return p.tolist()
    return _repair(groups, p.tolist(), rng)


def _repair(groups: list, p: list[int], rng) -> list[int]:
    """Swap targets until no prompt maps to its own group."""
    for _ in range(10 * len(p)):
        bad = [i for i in range(len(p)) if groups[p[i]] == groups[i]]
        if not bad:
            return p
        i = bad[0]
        for j in rng.permutation(len(p)):
            if groups[p[j]] != groups[i] and groups[p[i]] != groups[j]:
                p[i], p[j] = p[j], p[i]
                break
    raise UserError("could not build a derangement of the prompts; remove duplicate prompts")


def pmi_against(rendered: Rendered, tokenizer, data: DataConfig, seed: int) -> list[list[int]]:
    """What each prompt's answers are contrasted with when best-of-k ranks them by PMI: the
    prompt without its user context, or for a prompt with none another such prompt (drawn by
    a derangement; any other prompt when it is the only one)."""
    prompts, n = rendered.prompts, len(rendered.prompts)
    plain = [i for i, p in enumerate(prompts) if p.context is None]
    partner = (
        dict(zip(plain, [plain[j] for j in derangement(plain, seed)])) if len(plain) > 1 else {}
    )
    against = []
    for i, p in enumerate(prompts):
        if p.context is not None:
            turn = user_text(p.question, None, data)
            against.append(render(tokenizer, messages_for(p, turn, data), data.enable_thinking))
        else:
            against.append(rendered.ids[partner.get(i, (i + 1) % n)])
    return against


def k_answers(
    model, tokenizer, rendered: Rendered, k: int, generation, what: str, cache, should_stop
) -> list[list[Response]]:
    """k answers to each prompt (the pass of the chosen answers, kept in `cache`)."""
    stage = f"generate {what} ({k} each)"
    return sample_answers(
        model, tokenizer, rendered.ids, k, generation, stage, 0, cache, should_stop
    )


def chosen_answers(
    model,
    tokenizer,
    rendered: Rendered,
    config: PairsConfig,
    generation: GenerationConfig,
    data: DataConfig,
    cache: ResponseCache | None = None,
    should_stop=None,
) -> list[Response]:
    """One chosen answer per prompt; with pairs.samples = k > 1, the best of k by the current
    model's own PMI (the model that answers, before this round trains it)."""
    if config.samples == 1:
        stage = "generate chosen"
        return generate_all(
            model, tokenizer, rendered.ids, generation, stage, 0, cache, should_stop
        )
    k = config.samples
    samples = k_answers(model, tokenizer, rendered, k, generation, "chosen", cache, should_stop)
    against = pmi_against(rendered, tokenizer, data, config.seed)
    with dist.progress(2 * k * len(samples), "rank chosen by PMI") as progress:
        pmi = pmi_of_samples(
            model, rendered.ids, against, samples, pad_id(tokenizer), progress.update
        )
    picks = best_by_pmi(pmi, samples, generation)
    dist.say(
        f"best of {k}: the chosen answer's PMI {np.mean(pmi[np.arange(len(picks)), picks]):.2f} "
        f"nats on average, against {pmi[:, 0].mean():.2f} for a single sample"
    )
    return [answers[j] for answers, j in zip(samples, picks)]
