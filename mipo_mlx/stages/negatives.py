"""The negative strategies (pairs.negatives): how each pair's rejected answer is made.

A pair is (x, y+, y-): y+ is the model's answer to x; y- is an answer made without x's
information (another prompt's answer, or an answer to x with a sentence or the user's context
removed), always scored under x. Each strategy is a class registered by name in `NEGATIVES`,
as the losses are in `engine.losses.LOSSES`: `check` finds what its input lacks before anything
is generated, and `pairs` makes the pairs. A new strategy is a class here and its name in
`core.config.NEGATIVE_STRATEGIES` with what it needs of the settings (checked without mlx).
"""

from __future__ import annotations

from typing import ClassVar

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
from ..engine.selection import extract_result, majority_pair
from .answers import check_derangeable, chosen_answers, derangement, k_answers
from .run import Run

Caches = dict[str, ResponseCache]


class Strategy:
    """One way to make the rejected answers. `name` is the pairs.negatives value."""

    name: ClassVar[str]

    def check(self, rendered: Rendered, config: PairsConfig, data: DataConfig) -> None:
        """Raise UserError for input this strategy cannot pair, before any generation."""

    def pairs(
        self, run: Run, rendered: Rendered, generation: GenerationConfig, caches: Caches
    ) -> list[Pair]:
        """The pairs of these prompts; `caches` keep each generation pass ('chosen',
        'rejected') so that an interrupted run resumes them."""
        raise NotImplementedError


NEGATIVES: dict[str, Strategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    NEGATIVES[cls.name] = cls()
    return cls


def _chosen(run: Run, rendered: Rendered, generation: GenerationConfig, caches: Caches):
    c = run.config
    return chosen_answers(
        run.model,
        run.tokenizer,
        rendered,
        c.pairs,
        generation,
        c.data,
        caches.get("chosen"),
        run.stop,
    )


def _contents(rendered: Rendered, rows: list[int]) -> list[str]:
    return [rendered.messages[i][-1]["content"] for i in rows]


@register
class Random(Strategy):
    """The paper's MIPO: y- is another prompt's y+, drawn by a derangement (never x's own
    answer, nor a duplicate's); no second generation."""

    name = "random"

    def check(self, rendered, config, data):
        check_derangeable(_contents(rendered, list(range(len(rendered.prompts)))))

    def pairs(self, run, rendered, generation, caches):
        positives = _chosen(run, rendered, generation, caches)
        return random_pairs(rendered, positives, run.tokenizer, generation, run.config.pairs.seed)


class Generated(Strategy):
    """y- generated from an altered user turn (`altered`; None: the row gets no pair)."""

    def altered(self, prompts: list[Prompt], data: DataConfig, seed: int) -> list[str | None]:
        raise NotImplementedError

    def check(self, rendered, config, data):
        self.altered(rendered.prompts, data, config.seed)

    def pairs(self, run, rendered, generation, caches):
        c = run.config
        positives = _chosen(run, rendered, generation, caches)
        altered = self.altered(rendered.prompts, c.data, c.pairs.seed)
        return generated_pairs(
            run.model,
            run.tokenizer,
            rendered,
            positives,
            altered,
            self.name,
            generation,
            c.data,
            caches.get("rejected"),
            run.stop,
        )


@register
class Incomplete(Generated):
    """y- answers x with information removed: the row's `incomplete` text if it has one (SVAMP:
    the Question without its Body), else x with one random non-final sentence dropped."""

    name = "incomplete"

    def altered(self, prompts, data, seed):
        rng = np.random.default_rng(seed)
        return [
            _maybe(_given_incomplete(p) or drop_one_sentence(p.question, rng), p.context, data)
            for p in prompts
        ]


def _need_context(prompts: list[Prompt], strategy: str) -> None:
    missing = [p.where for p in prompts if p.context is None]
    if missing:
        raise UserError(
            f"{missing[0]}: pairs.negatives={strategy} needs a 'context' on every prompt row; "
            "this one has none"
        )


@register
class NoContext(Generated):
    """y- answers x without the user's context (every row needs one)."""

    name = "no_context"

    def altered(self, prompts, data, seed):
        _need_context(prompts, self.name)
        return [user_text(p.question, None, data) for p in prompts]


@register
class RandomContext(Generated):
    """y- answers x with another user's context (a derangement over the contexts)."""

    name = "random_context"

    def altered(self, prompts, data, seed):
        _need_context(prompts, self.name)
        other = derangement([p.context for p in prompts], seed)
        return [user_text(p.question, prompts[j].context, data) for p, j in zip(prompts, other)]


@register
class Mixed(Strategy):
    """`no_context` negatives for the rows with a context, `random` ones for the others, drawn
    among themselves; each pair records the strategy it got."""

    name = "mixed"

    def check(self, rendered, config, data):
        plain = _plain_rows(rendered)
        if plain:
            check_derangeable(_contents(rendered, plain))

    def pairs(self, run, rendered, generation, caches):
        c = run.config
        positives = _chosen(run, rendered, generation, caches)
        pairs = []
        altered = [
            None if p.context is None else user_text(p.question, None, c.data)
            for p in rendered.prompts
        ]
        if any(text is not None for text in altered):
            pairs = generated_pairs(
                run.model,
                run.tokenizer,
                rendered,
                positives,
                altered,
                NoContext.name,
                generation,
                c.data,
                caches.get("rejected"),
                run.stop,
            )
        plain = _plain_rows(rendered)
        if plain:  # the rows without a context draw their negatives from each other
            pairs += random_pairs(
                rendered, positives, run.tokenizer, generation, c.pairs.seed, among=plain
            )
            pairs.sort(key=lambda pair: pair.source)
        return pairs


def _plain_rows(rendered: Rendered) -> list[int]:
    return [i for i, p in enumerate(rendered.prompts) if p.context is None]


@register
class MajorityVote(Strategy):
    """Self-consistency pairs (ScPO): pairs.samples answers per prompt vote on the final result;
    chosen has the most common one and rejected the least (majority_vote_pairs)."""

    name = "majority_vote"

    def pairs(self, run, rendered, generation, caches):
        c = run.config.pairs
        samples = k_answers(
            run.model,
            run.tokenizer,
            rendered,
            c.samples,
            generation,
            "answers",
            caches.get("chosen"),
            run.stop,
        )
        return majority_vote_pairs(rendered, samples, run.tokenizer, generation, c.min_vote_margin)


def _given_incomplete(prompt: Prompt) -> str | None:
    """The row's own prompt with information removed (SVAMP: the Question without its Body)."""
    given = prompt.extra.get("incomplete")
    return given.strip() if isinstance(given, str) and given.strip() else None


def _maybe(question: str | None, context: str | None, data: DataConfig) -> str | None:
    return None if question is None else user_text(question, context, data)


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
                messages=rendered.messages[i],
                chosen=decode(tokenizer, positives[i]),
                rejected=decode(tokenizer, positives[j]),
                prompt_ids=rendered.ids[i],
                chosen_ids=positives[i].token_ids,
                rejected_ids=positives[j].token_ids,
                negatives="random",
                source=i,
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
            messages=rendered.messages[i],
            chosen=decode(tokenizer, positives[i]),
            rejected=decode(tokenizer, negative),
            prompt_ids=rendered.ids[i],
            chosen_ids=positives[i].token_ids,
            rejected_ids=negative.token_ids,
            negatives=strategy,
            source=i,
            rejected_prompt=altered[i],
        )
        for i, negative in zip(todo, negatives)
        if usable(negative, generation)
    ]
    if not pairs:
        raise UserError("no pair survived the truncation rule; raise generation.max_tokens")
    return pairs


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
                messages=rendered.messages[i],
                chosen=texts[c],
                rejected=texts[r],
                prompt_ids=rendered.ids[i],
                chosen_ids=answers[kept[c]].token_ids,
                rejected_ids=answers[kept[r]].token_ids,
                negatives="majority_vote",
                source=i,
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
