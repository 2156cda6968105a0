"""Personalization evaluation with a local judge model (any mlx-lm chat model).

The paper's protocol (PRISM, Community Alignment, Multi-Bench): a judge scores a
response 1-5 against each preference the user stated, the item's score is the mean
over its preferences, and the win rate is the share of items where the policy's
score is at least the reference response's score (ties count as wins).

Rules (each tested on written-out cases):
  preferences: the context split on newlines and ';', with leading bullets
               ('-', '*', '1.', '1)') removed and empty items dropped.
  score:       the last 'Score: N' / 'score of N' / '**Score:** N' (any case), else
               the last 'N/5', else the last standalone digit 1-5 that is not part of a
               range ('1-5', '1 to 5') or a legend ('5 = ...'); None when there is
               none or the stated score is not an integer in 1-5.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..core.config import EvaluationConfig, GenerationConfig, ModelConfig
from ..core.errors import Stopped, UserError
from ..data.prompts import Prompt, render
from ..engine import distributed as dist
from ..engine import model as mdl
from ..engine.generation import decode, generate

SCALE = (1, 5)

_SEPARATORS = re.compile(r"[\n;]")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s*")
_SCORE_WORD = re.compile(
    r"\b(?:score|rating)\b\s*(?:of|is|=)?[\s:*]*(\d+(?:\.\d+)?)", re.IGNORECASE
)
_OUT_OF_FIVE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:/|out of)\s*5\b", re.IGNORECASE)
_NOT_A_SCORE = re.compile(r"\b\d+\s*(?:-|\u2013|to)\s*\d+\b|\b\d+\s*=")  # ranges, scale legends
_STANDALONE = re.compile(r"(?<![\w.\-/])([1-5])(?![\w/]|\.\d)")

JUDGE_TEMPLATE = (
    "You are evaluating how well an assistant's response satisfies one preference stated by the "
    """user.

User's question:
{question}

The user's stated preference:
{preference}

Assistant's response:
{response}

Rate how well the response satisfies this one preference on an integer scale from 1 to 5:
1 = ignores or contradicts the preference
2 = mostly fails to satisfy it
3 = partly satisfies it
4 = mostly satisfies it
5 = fully satisfies it

"""
    "Judge only this preference, not other qualities of the response. Give a one-sentence reason, "
    'then end with a line of the form "Score: <1-5>".'
)


@dataclass
class JudgeItem:
    """One response to judge: the question, the user's stated preferences, and the answer."""

    question: str
    context: str  # the user's stated preferences, as in a prompt file's 'context'
    response: str


@dataclass
class ItemScore:
    """The judge's verdict on one item."""

    score: float | None  # mean of the parsed per-preference scores; None when none parsed
    scores: list[int | None]  # one per stated preference, in order
    unparsed: int  # judge answers with no score in 1-5


def split_preferences(context: str) -> list[str]:
    """The user's stated preferences as separate items; a context with no separators is one item."""
    items = (_BULLET.sub("", part, count=1).strip() for part in _SEPARATORS.split(context))
    return [item for item in items if item]


def judge_prompt(question: str, preference: str, response: str) -> list[dict[str, str]]:
    """Chat turns asking the judge for a 1-5 score of `response` against one preference.

    A single user turn: some chat templates (Gemma's) reject a system turn.
    """
    text = JUDGE_TEMPLATE.format(
        question=question.strip(), preference=preference.strip(), response=response.strip()
    )
    return [{"role": "user", "content": text}]


def _in_scale(value: str) -> int | None:
    number = float(value)
    if not number.is_integer() or not SCALE[0] <= number <= SCALE[1]:
        return None
    return int(number)


def parse_score(text: str) -> int | None:
    """The judge's 1-5 score in `text`, by the rules in the module docstring."""
    for pattern in (_SCORE_WORD, _OUT_OF_FIVE):
        found = pattern.findall(text)
        if found:
            return _in_scale(found[-1])
    found = _STANDALONE.findall(_NOT_A_SCORE.sub(" ", text))
    return int(found[-1]) if found else None


def judge_config(max_tokens: int, batch_size: int) -> GenerationConfig:
    """Greedy decoding (temperature 0) that keeps answers cut at max_tokens."""
    return GenerationConfig(
        temperature=0.0,
        top_p=1.0,
        max_tokens=max_tokens,
        batch_size=batch_size,
        truncated="keep",
        seed=0,
    )


def score_response(
    judge,
    tokenizer,
    items: list[JudgeItem],
    max_tokens: int = 128,
    batch_size: int = 16,
    should_stop: Callable[[], bool] | None = None,
) -> list[ItemScore]:
    """Judge each item's response against each of its stated preferences, in one batched pass.

    `judge` and `tokenizer` are a loaded mlx-lm model (e.g. from `mlx_lm.load`); where
    `should_stop` says so after a judge answer, `Stopped` ends the pass.
    """
    preferences = [split_preferences(item.context) for item in items]
    for number, prefs in enumerate(preferences):
        if not prefs:
            raise UserError(
                f"judge item {number}: the context states no preference to judge against"
            )
    prompts = [
        render(tokenizer, judge_prompt(item.question, pref, item.response), enable_thinking=False)
        for item, prefs in zip(items, preferences)
        for pref in prefs
    ]
    with dist.progress(len(prompts), "judge") as progress:

        def judged(i: int, response) -> None:
            progress.update()
            if should_stop is not None and should_stop():
                raise Stopped(0, "while the judge scored the answers")

        answers = generate(
            judge,
            tokenizer,
            prompts,
            judge_config(max_tokens, batch_size),
            streams=list(range(len(prompts))),
            on_done=judged,
        )
    parsed = iter([parse_score(decode(tokenizer, answer)) for answer in answers])
    results = []
    for prefs in preferences:
        scores = [next(parsed) for _ in prefs]
        kept = [s for s in scores if s is not None]
        mean = sum(kept) / len(kept) if kept else None
        results.append(ItemScore(mean, scores, len(scores) - len(kept)))
    return results


def win_rate(policy: list[float | None], reference: list[float | None]) -> float:
    """Share of items where the policy scores at least the reference (ties win).

    Items where either score is None are left out; nan when no item is left.
    """
    if len(policy) != len(reference):
        raise ValueError(
            f"win_rate: {len(policy)} policy scores but {len(reference)} reference scores"
        )
    pairs = [(p, r) for p, r in zip(policy, reference) if p is not None and r is not None]
    if not pairs:
        return math.nan
    return sum(p >= r for p, r in pairs) / len(pairs)


def judge_summary(policy: list[ItemScore], reference: list[ItemScore] | None = None) -> dict:
    """Judge metrics of the policy's responses; win_rate is nan without reference scores.

    judge_score: mean of the items' scores (items with none parsed are left out; nan if all);
    unparsed: the policy's judge answers with no score in 1-5; items: policy items judged.
    """
    scores = [item.score for item in policy]
    kept = [s for s in scores if s is not None]
    rate = math.nan if reference is None else win_rate(scores, [item.score for item in reference])
    return {
        "judge_score": sum(kept) / len(kept) if kept else math.nan,
        "win_rate": rate,
        "unparsed": sum(item.unparsed for item in policy),
        "items": len(policy),
    }


def _known(value: float) -> float | None:
    """nan (no judge answer parsed) as None: JSON has no nan."""
    return None if math.isnan(value) else value


def add_judge(
    results: dict[str, dict],
    prompts: list[Prompt],
    config: EvaluationConfig,
    trust_remote_code: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """With evaluation.judge: judge every model's answers (and the rows' reference responses);
    add judge_score, unparsed and per-item scores to each, and the win rates (ties win). The
    judge runs code shipped with it only with `trust_remote_code` (model.trust_remote_code,
    which a run folder's config.yaml never sets); `should_stop` as in `score_response`."""
    if not config.judge:
        return
    judge, tokenizer, _ = mdl.load(
        ModelConfig(path=config.judge, trust_remote_code=trust_remote_code)
    )

    def scores(answers: list[str]) -> list[ItemScore]:
        items = [JudgeItem(p.question, p.context, a) for p, a in zip(prompts, answers)]
        return score_response(
            judge, tokenizer, items, config.judge_max_tokens, config.judge_batch_size, should_stop
        )

    judged = {name: scores(result["answers"]) for name, result in results.items()}
    references = [p.extra.get("reference") for p in prompts]
    reference = (
        scores(references) if all(isinstance(r, str) and r.strip() for r in references) else None
    )
    for name, items in judged.items():
        summary = judge_summary(items, reference)
        results[name].update(
            judge_score=_known(summary["judge_score"]),
            judge_unparsed=summary["unparsed"],
            judge_scores=[item.score for item in items],
        )
        if reference is not None:
            results[name]["win_rate_reference"] = _known(summary["win_rate"])
    if "base" in judged and len(judged) > 1:
        base = [item.score for item in judged["base"]]
        for name, items in judged.items():
            if name != "base":
                results[name]["win_rate"] = _known(win_rate([item.score for item in items], base))
