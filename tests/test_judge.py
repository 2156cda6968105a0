"""Personalization judging: preference splitting, score parsing, win rate, and a judged run."""

from __future__ import annotations

import math

import pytest

from mipo_mlx.core.errors import UserError
from mipo_mlx.stages.judge import (
    ItemScore,
    JudgeItem,
    judge_prompt,
    judge_summary,
    parse_score,
    score_response,
    split_preferences,
    win_rate,
)

SCORES = [
    ("Score: 4", 4),
    ("The response is concise.\nScore: 5", 5),
    ("score: 2", 2),
    ("SCORE:3", 3),
    ("**Score:** 4", 4),
    ("Score: **1**", 1),
    ("I would give it a score of 3.", 3),
    ("The final score is 5.", 5),
    ("Rating: 2", 2),
    ("It mostly follows the preference: 4/5", 4),
    ("I rate it 3 out of 5.", 3),
    ("Clarity is 2/5 but overall Score: 4", 4),
    ("Score: 2 at first, but on reflection Score: 3", 3),
    ("Score: 4/5", 4),
    ("It fits the preference well, I'd say 4.", 4),
    ("On a 1-5 scale, this is a 2", 2),
    ("Score: 7", None),
    ("Score: 0", None),
    ("Score: 4.5", None),
    ("6/5, perfect", None),
    ("I cannot rate this", None),
    ("", None),
    ("Score: <1-5>", None),
    ("It uses 10 examples and 3.5 pages", None),
    ("On a 1-5 scale I cannot say", None),
    ("Scale from 1 to 5, where 5 = fully. I cannot tell.", None),
]


@pytest.mark.parametrize(("text", "expected"), SCORES)
def test_parse_score(text, expected):
    assert parse_score(text) == expected


PREFERENCES = [
    ("- Be concise\n- Use examples\n- No jargon", ["Be concise", "Use examples", "No jargon"]),
    ("* formal tone\n*   cite sources", ["formal tone", "cite sources"]),
    (
        "1. Short answers\n2. Bullet points\n10. British spelling",
        ["Short answers", "Bullet points", "British spelling"],
    ),
    ("1) vegan recipes\n2) under 30 minutes", ["vegan recipes", "under 30 minutes"]),
    (
        "be brief; use metric units ;  avoid emojis;",
        ["be brief", "use metric units", "avoid emojis"],
    ),
    (
        "I prefer answers that explain the reasoning step by step.",
        ["I prefer answers that explain the reasoning step by step."],
    ),
    (
        "  likes well-known examples, e.g. 3.5 stars  ",
        ["likes well-known examples, e.g. 3.5 stars"],
    ),
    ("\n- first\n\n-\n; \n2. second\n", ["first", "second"]),
    ("", []),
]


@pytest.mark.parametrize(("context", "expected"), PREFERENCES)
def test_split_preferences(context, expected):
    assert split_preferences(context) == expected


def test_judge_prompt_is_one_user_turn_with_the_parts_and_the_answer_format():
    messages = judge_prompt("What should I cook?", "vegan recipes", "Try a lentil curry.")
    assert [m["role"] for m in messages] == ["user"]
    text = messages[0]["content"]
    for part in (
        "What should I cook?",
        "vegan recipes",
        "Try a lentil curry.",
        "Score: <1-5>",
        "1 =",
        "5 =",
    ):
        assert part in text
    assert parse_score(text) is None  # the instructions alone carry no score


def test_win_rate_hand_computed():
    # items: 3>=3 win, 4>=5 loss, 2>=1 win, (5, None) left out -> 2/3
    assert win_rate([3, 4, 2, 5], [3, 5, 1, None]) == pytest.approx(2 / 3)


def test_win_rate_ties_count_as_wins():
    assert win_rate([2.5, 4.0], [2.5, 4.0]) == 1.0


def test_win_rate_leaves_out_items_where_either_score_is_none():
    assert win_rate([None, 1, 5], [5, 2, None]) == 0.0
    assert win_rate([None, 3], [4, None]) != win_rate([None, 3], [4, None])  # nan


def test_win_rate_of_no_items_is_nan():
    assert math.isnan(win_rate([], []))


def test_win_rate_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="3 policy scores but 2 reference"):
        win_rate([1, 2, 3], [1, 2])


def test_judge_summary_counts_unparsed_and_compares_with_the_reference():
    policy = [ItemScore(4.0, [4, None], 1), ItemScore(None, [None], 1), ItemScore(2.0, [2], 0)]
    reference = [ItemScore(3.0, [3], 0), ItemScore(5.0, [5], 0), ItemScore(2.5, [2, 3], 0)]
    summary = judge_summary(policy, reference)
    assert summary == {"judge_score": 3.0, "win_rate": 0.5, "unparsed": 2, "items": 3}
    assert math.isnan(judge_summary(policy)["win_rate"])
    assert math.isnan(judge_summary([ItemScore(None, [None], 1)])["judge_score"])


ITEMS = [
    JudgeItem(
        "What should I cook tonight?",
        "- vegan\n- under 30 minutes",
        "A lentil curry takes 25 minutes.",
    ),
    JudgeItem(
        "Explain gravity.",
        "Keep it short; no equations; use an analogy",
        "Mass bends space like a ball on a sheet.",
    ),
    JudgeItem("Which planet is red?", "Answer in one word.", "Mars."),
]


def test_score_response_with_the_toy_model_as_judge(toy_model):
    judge, tokenizer = toy_model
    results = score_response(judge, tokenizer, ITEMS, max_tokens=12, batch_size=4)
    assert [len(r.scores) for r in results] == [2, 3, 1]
    for result in results:
        assert all(s is None or 1 <= s <= 5 for s in result.scores)
        kept = [s for s in result.scores if s is not None]
        assert result.unparsed == result.scores.count(None)
        assert result.score == (pytest.approx(sum(kept) / len(kept)) if kept else None)
    summary = judge_summary(results, results)
    assert set(summary) == {"judge_score", "win_rate", "unparsed", "items"}
    assert summary["items"] == 3
    assert summary["unparsed"] == sum(r.scores.count(None) for r in results)
    assert math.isnan(summary["win_rate"]) or summary["win_rate"] == 1.0


def test_score_response_is_greedy_so_repeats_agree(toy_model):
    judge, tokenizer = toy_model
    first = score_response(judge, tokenizer, ITEMS[:2], max_tokens=8)
    again = score_response(judge, tokenizer, ITEMS[:2], max_tokens=8, batch_size=1)
    assert [r.scores for r in first] == [r.scores for r in again]


def test_score_response_rejects_an_item_without_preferences(toy_model):
    judge, tokenizer = toy_model
    with pytest.raises(UserError, match="judge item 1: the context states no preference"):
        score_response(judge, tokenizer, [ITEMS[0], JudgeItem("Hi?", " ;\n- ", "Hello.")])


def test_add_judge_win_rates_against_base_and_reference(monkeypatch):
    """Rows with a `reference` response: each model also gets its win rate against it (ties win)."""
    from mipo_mlx.core.config import Config
    from mipo_mlx.data.prompts import Prompt
    from mipo_mlx.engine import model
    from mipo_mlx.stages import judge

    verdicts = {"b1": 3, "b2": 2, "b3": 4, "m1": 4, "m2": 2, "m3": 3, "r1": 3, "r2": 3, "r3": None}

    def score_response(_judge, _tokenizer, items, max_tokens, batch_size, should_stop=None):
        return [
            judge.ItemScore(
                verdicts[i.response], [verdicts[i.response]], verdicts[i.response] is None
            )
            for i in items
        ]

    monkeypatch.setattr(judge, "score_response", score_response)
    monkeypatch.setattr(model, "load", lambda config: (object(), object(), {}))
    prompts = [
        Prompt(f"p.jsonl:{n}", f"q{n}", "be brief", extra={"reference": f"r{n}"}) for n in (1, 2, 3)
    ]
    results = {"base": {"answers": ["b1", "b2", "b3"]}, "mipo": {"answers": ["m1", "m2", "m3"]}}
    config = Config()
    config.evaluation.judge = "some/judge"
    judge.add_judge(results, prompts, config.evaluation)
    assert results["base"]["judge_score"] == 3.0 and results["mipo"]["judge_score"] == 3.0
    assert results["mipo"]["win_rate"] == 2 / 3  # 4>=3, 2>=2, 3<4
    assert results["base"]["win_rate_reference"] == 1 / 2  # 3>=3, 2<3, item 3 unscored by the judge
    assert results["mipo"]["win_rate_reference"] == 1 / 2  # 4>=3, 2<3, item 3 left out
    assert results["mipo"]["judge_unparsed"] == 0 and results["mipo"]["judge_scores"] == [4, 2, 3]
