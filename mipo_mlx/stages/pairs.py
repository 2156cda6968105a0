"""The pairs stage: negative strategies, the derangement, best-of-k chosen answers and
majority-vote pairs.

A pair is (x, y+, y-): y+ is the base model's answer to x; y- is an answer made
without x's information (another prompt's answer, or an answer to x with a
sentence or the user's context removed). Both are always scored under x.
`build_pairs` generates the answers and makes the pairs; `pair_file` holds their schema.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..core.config import DataConfig, GenerationConfig, PairsConfig
from ..core.errors import UserError
from ..data.pair_file import Pair
from ..data.prompts import Prompt, Rendered, drop_one_sentence, messages_for, render, user_text
from ..engine import distributed as dist
from ..engine.generation import (
    STREAM_STRIDE,
    Response,
    ResponseCache,
    decode,
    generate_all,
    usable,
    usable_indices,
)
from ..engine.model import pad_id
from ..engine.selection import (
    best_by_pmi,
    extract_result,
    majority_pair,
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


def altered_prompts(
    prompts: list[Prompt], strategy: str, data: DataConfig, seed: int
) -> list[str | None]:
    """The user turn each negative is generated from, for the generating strategies.

    incomplete: the row's `incomplete` text if it has one, else x with one random
    non-final sentence dropped (None: nothing to drop);
    no_context: x without the user's context; random_context: x with another
    user's context (a derangement over contexts); mixed: no_context for the rows with
    a context, None for the others (they get `random` negatives). `random` generates nothing.
    """
    rng = np.random.default_rng(seed)
    if strategy == "mixed":
        return [None if p.context is None else user_text(p.question, None, data) for p in prompts]
    if strategy == "incomplete":
        return [
            _maybe(_given_incomplete(p) or drop_one_sentence(p.question, rng), p.context, data)
            for p in prompts
        ]
    missing = [p.where for p in prompts if p.context is None]
    if missing:
        raise UserError(
            f"{missing[0]}: pairs.negatives={strategy} needs a 'context' on every prompt row; "
            "this one has none"
        )
    if strategy == "no_context":
        return [user_text(p.question, None, data) for p in prompts]
    if strategy == "random_context":
        other = derangement([p.context for p in prompts], seed)
        return [user_text(p.question, prompts[j].context, data) for p, j in zip(prompts, other)]
    raise ValueError(f"strategy {strategy!r} generates no negatives")


def _given_incomplete(prompt: Prompt) -> str | None:
    """The row's own prompt with information removed (SVAMP: the Question without its Body)."""
    given = prompt.extra.get("incomplete")
    return given.strip() if isinstance(given, str) and given.strip() else None


def _maybe(question: str | None, context: str | None, data: DataConfig) -> str | None:
    return None if question is None else user_text(question, context, data)


def split_pairs(pairs: list[Pair], valid_fraction: float, seed: int) -> list[Pair]:
    """Mark a seeded random share of pairs as 'valid' (held out from training)."""
    n_valid = int(round(len(pairs) * valid_fraction))
    if n_valid and len(pairs) - n_valid < 1:
        n_valid = len(pairs) - 1
    chosen = set(np.random.default_rng(seed + 1).permutation(len(pairs))[:n_valid].tolist())
    for i, pair in enumerate(pairs):
        pair.split = "valid" if i in chosen else "train"
    return pairs


def check_pairs_possible(rendered: Rendered, config: PairsConfig, data: DataConfig) -> None:
    """Input problems the negative strategy would hit, found before any generation or write."""
    if config.negatives in ("random", "mixed"):
        plain = _without_context(rendered, config.negatives)
        if plain:
            check_derangeable([rendered.messages[i][-1]["content"] for i in plain])
    if config.negatives not in ("random", "majority_vote"):  # these generate from x itself
        altered_prompts(rendered.prompts, config.negatives, data, config.seed)


def _without_context(rendered: Rendered, strategy: str) -> list[int]:
    """The rows that get `random` negatives: all of them with `random`; with `mixed`, the rows
    without a context."""
    if strategy == "random":
        return list(range(len(rendered.prompts)))
    return [i for i, p in enumerate(rendered.prompts) if p.context is None]


def random_pairs(
    rendered: Rendered,
    positives: list[Response],
    tokenizer,
    generation: GenerationConfig,
    seed: int,
    among: list[int] | None = None,
) -> list[Pair]:
    """`random` negatives: another prompt's positive, via a derangement; no second generation.
    With `among`, only those rows get pairs, and their negatives come from each other."""
    keep = usable_indices(positives, generation, 2)
    if among is not None:
        keep = sorted(set(keep) & set(among))
        if len(keep) < 2:
            raise UserError(
                f"pairs.negatives=mixed: {len(keep)} usable answer(s) to prompts without a "
                "context; their random negatives need 2 (raise generation.max_tokens)"
            )
    other = derangement([rendered.messages[i][-1]["content"] for i in keep], seed)
    pairs = []
    for slot, i in enumerate(keep):
        j = keep[other[slot]]
        pairs.append(
            Pair(
                rendered.messages[i],
                decode(tokenizer, positives[i]),
                decode(tokenizer, positives[j]),
                rendered.ids[i],
                positives[i].token_ids,
                positives[j].token_ids,
                "random",
                i,
                rejected_source=j,
            )
        )
    return pairs


def generated_pairs(
    model,
    tokenizer,
    rendered: Rendered,
    positives: list[Response],
    altered: list[str | None],
    strategy: str,
    generation: GenerationConfig,
    data: DataConfig,
    cache: ResponseCache | None = None,
    should_stop=None,
) -> list[Pair]:
    """incomplete / no_context / random_context: generate y- from each `altered` user turn
    (rows whose altered turn is None get no pair)."""
    keep = set(usable_indices(positives, generation, 1))
    todo = [i for i, text in enumerate(altered) if text is not None and i in keep]
    if not todo:
        raise UserError(
            f"pairs.negatives={strategy}: no prompt can be altered (e.g. no prompt has "
            "two sentences for 'incomplete'); choose another strategy"
        )
    ids = [
        render(tokenizer, messages_for(rendered.prompts[i], altered[i], data), data.enable_thinking)
        for i in todo
    ]
    negatives = generate_all(
        model,
        tokenizer,
        ids,
        generation,
        f"generate {strategy}",
        STREAM_STRIDE,
        cache,
        should_stop,
    )
    pairs = [
        Pair(
            rendered.messages[i],
            decode(tokenizer, positives[i]),
            decode(tokenizer, negative),
            rendered.ids[i],
            positives[i].token_ids,
            negative.token_ids,
            strategy,
            i,
            rejected_prompt=altered[i],
        )
        for i, negative in zip(todo, negatives)
        if usable(negative, generation)
    ]
    if not pairs:
        raise UserError("no pair survived the truncation rule; raise generation.max_tokens")
    return pairs


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


def majority_vote_pairs(
    rendered: Rendered,
    samples: list[list[Response]],
    tokenizer,
    generation: GenerationConfig,
    min_margin: int,
) -> list[Pair]:
    """Self-consistency pairs (ScPO): among each prompt's usable answers, chosen has the most
    common final result and rejected the least common (selection.majority_pair); prompts
    without a clear majority get no pair."""
    pairs = []
    for i, answers in enumerate(samples):
        kept = [j for j, answer in enumerate(answers) if usable(answer, generation)]
        texts = [decode(tokenizer, answers[j]) for j in kept]
        pick = majority_pair([extract_result(t) for t in texts], min_margin)
        if pick is None:
            continue
        c, r = pick
        pairs.append(
            Pair(
                rendered.messages[i],
                texts[c],
                texts[r],
                rendered.ids[i],
                answers[kept[c]].token_ids,
                answers[kept[r]].token_ids,
                "majority_vote",
                i,
            )
        )
    dist.say(
        f"majority vote: {len(pairs)} of {len(samples)} prompts have a majority result at "
        f"least {min_margin} vote(s) ahead of another"
    )
    if not pairs:
        raise UserError(
            "pairs.negatives=majority_vote: no prompt's answers had a majority result ahead of "
            "another; raise pairs.samples or generation.temperature, or lower "
            "pairs.min_vote_margin"
        )
    return pairs


def drop_identical(pairs: list[Pair]) -> list[Pair]:
    """The pairs whose chosen and rejected answers differ: a pair with the same text on both
    sides has a zero DPO gradient but would count in its batch's mean."""
    kept = [p for p in pairs if p.chosen != p.rejected]
    if len(kept) < len(pairs):
        dist.say(
            f"dropped {len(pairs) - len(kept)} of {len(pairs)} pairs with the same text on "
            "both sides"
        )
    if not kept:
        raise UserError(
            f"all {len(pairs)} pairs have the same text on both sides: nothing to learn; raise "
            "generation.temperature, or set pairs.drop_identical=false"
        )
    return kept


def build_pairs(
    model,
    tokenizer,
    rendered: Rendered,
    config: PairsConfig,
    generation: GenerationConfig,
    data: DataConfig,
    caches: dict[str, ResponseCache] | None = None,
    should_stop=None,
) -> list[Pair]:
    """Answer every prompt (chosen), make the negatives as `config.negatives` says, drop the
    pairs with the same text on both sides (pairs.drop_identical), and mark a share of the
    pairs for validation. `caches` keep each pass's responses ('chosen', 'rejected').
    `mixed`: rows with a context get `no_context` negatives, the others `random` ones drawn
    among themselves; each pair records the strategy it got. `majority_vote`: pairs.samples
    answers per prompt vote (majority_vote_pairs)."""
    caches = caches or {}
    if config.negatives == "majority_vote":
        k, cache = config.samples, caches.get("chosen")
        samples = k_answers(
            model, tokenizer, rendered, k, generation, "answers", cache, should_stop
        )
        pairs = majority_vote_pairs(
            rendered, samples, tokenizer, generation, config.min_vote_margin
        )
    else:
        pairs = contrast_pairs(
            model, tokenizer, rendered, config, generation, data, caches, should_stop
        )
    if config.drop_identical:
        pairs = drop_identical(pairs)
    return split_pairs(pairs, data.valid_fraction, config.seed)


def contrast_pairs(
    model,
    tokenizer,
    rendered: Rendered,
    config: PairsConfig,
    generation: GenerationConfig,
    data: DataConfig,
    caches: dict[str, ResponseCache],
    should_stop=None,
) -> list[Pair]:
    """MIPO's pairs: each prompt's chosen answer, and a rejected answer made without the
    prompt's information, as `config.negatives` says."""
    positives = chosen_answers(
        model, tokenizer, rendered, config, generation, data, caches.get("chosen"), should_stop
    )
    if config.negatives == "random":
        return random_pairs(rendered, positives, tokenizer, generation, config.seed)
    altered = altered_prompts(rendered.prompts, config.negatives, data, config.seed)
    strategy = "no_context" if config.negatives == "mixed" else config.negatives
    pairs = []
    if any(text is not None for text in altered) or config.negatives != "mixed":
        rejected = caches.get("rejected")
        pairs = generated_pairs(
            model,
            tokenizer,
            rendered,
            positives,
            altered,
            strategy,
            generation,
            data,
            rejected,
            should_stop,
        )
    plain = _without_context(rendered, "mixed") if config.negatives == "mixed" else []
    if plain:  # mixed: the rows without a context draw their negatives from each other
        seed = config.seed
        pairs += random_pairs(rendered, positives, tokenizer, generation, seed, among=plain)
        pairs.sort(key=lambda pair: pair.source)
    return pairs
