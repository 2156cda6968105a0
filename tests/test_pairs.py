"""Pairs: the derangement, the altered prompts, the pair file and the split."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from mipo_mlx.core.config import DataConfig
from mipo_mlx.core.errors import UserError
from mipo_mlx.data.pair_file import Pair, pair_from_row, read_pairs, write_pairs
from mipo_mlx.data.prompts import Prompt, split_sentences
from mipo_mlx.stages.answers import _repair, derangement
from mipo_mlx.stages.negatives import NEGATIVES, Generated
from mipo_mlx.stages.pairs import split_pairs


def altered_turns(prompts, strategy, data, seed):
    """The user turns a generating strategy answers instead of the prompts."""
    return NEGATIVES[strategy].altered(prompts, data, seed)


# ---------------------------------------------------------------- derangement


def assert_derangement(groups: list, p: list[int]) -> None:
    n = len(groups)
    assert sorted(p) == list(range(n)), "not a permutation"
    assert all(type(j) is int for j in p)
    for i in range(n):
        assert p[i] != i
        assert groups[p[i]] != groups[i]


@pytest.mark.parametrize("n", range(2, 51))
def test_derangement_distinct_groups(n):
    groups = [f"prompt {i}" for i in range(n)]
    for seed in range(20):
        assert_derangement(groups, derangement(groups, seed))


def test_derangement_n2_is_the_swap():
    assert derangement(["a", "b"], 0) == [1, 0]
    assert derangement(["a", "b"], 123) == [1, 0]


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31])
def test_derangement_deterministic_for_a_seed(seed):
    groups = list(range(30))
    assert derangement(groups, seed) == derangement(groups, seed)


def test_derangement_differs_between_seeds():
    groups = list(range(30))
    results = {tuple(derangement(groups, seed)) for seed in range(10)}
    assert len(results) == 10


def test_derangement_is_not_biased_to_one_target():
    # Over many seeds, item 0 is sent to every other index at least once.
    groups = list(range(6))
    targets = Counter(derangement(groups, seed)[0] for seed in range(300))
    assert set(targets) == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("groups", [[], ["only"]])
def test_derangement_needs_two_prompts(groups):
    with pytest.raises(UserError, match=f"^{len(groups)} prompt"):
        derangement(groups, 0)


@pytest.mark.parametrize(
    "groups",
    [
        ["a", "a", "b"],
        ["a", "a", "a", "b", "c"],
        ["x"] * 4,
        ["a"] * 6 + ["b"] * 2 + ["c"] * 3,
    ],
)
def test_derangement_more_than_half_identical_raises(groups):
    largest = max(Counter(groups).values())
    with pytest.raises(UserError, match=f"{largest} of {len(groups)} prompts are identical"):
        derangement(groups, 0)


@pytest.mark.parametrize("seed", range(40))
def test_derangement_with_duplicates_respects_groups(seed):
    groups = ["a"] * 3 + ["b"] * 2 + ["c"] * 4 + ["d"] + ["e"] * 2
    assert_derangement(groups, derangement(groups, seed))


@pytest.mark.parametrize("seed", range(60))
def test_derangement_exactly_half_identical(seed):
    # Only 5!*5!/10! = 1/252 of permutations fit, so most seeds go through the repair pass.
    groups = ["a"] * 5 + ["b"] * 5
    assert_derangement(groups, derangement(groups, seed))
    groups = ["a"] * 6 + ["b"] * 3 + ["c"] * 3
    assert_derangement(groups, derangement(groups, seed))


def test_repair_fixes_the_identity():
    groups = ["a"] * 5 + ["b"] * 5
    p = _repair(groups, list(range(10)), np.random.default_rng(0))
    assert_derangement(groups, p)
    groups = ["a", "b", "c", "a", "b", "c", "d"]
    p = _repair(groups, list(range(7)), np.random.default_rng(3))
    assert_derangement(groups, p)


def test_repair_path_is_taken_and_valid(monkeypatch):
    # Force every random draw to be the identity: the result must come from the repair pass.
    import mipo_mlx.stages.pairs as pairs_mod

    real_rng = np.random.default_rng

    class IdentityRng:
        def __init__(self, seed):
            self.inner = real_rng(seed)

        def permutation(self, n):
            return np.arange(n)

    calls = []

    def fake_rng(seed):
        calls.append(seed)
        return IdentityRng(seed)

    monkeypatch.setattr(pairs_mod.np.random, "default_rng", fake_rng)
    groups = ["a"] * 5 + ["b"] * 5
    p = derangement(groups, 7)
    assert calls == [7]
    assert_derangement(groups, p)


# ---------------------------------------------------------------- altered prompts

PLAIN = DataConfig(prompt_template="{prompt}", context_template="{prompt} || {context}")


def prompt(line, question, context=None):
    return Prompt(where=f"p.jsonl:{line}", question=question, context=context)


QUESTIONS = [
    "Tom has 3 apples. He buys 4 more. His sister gives him 2. How many apples does he have?",
    "A train leaves at noon. It travels 60 km per hour. How far has it gone by 3 pm?",
    "What is 2 + 2?",
    "Sara reads 10 pages a day. The book has 100 pages. She started on Monday. "
    "She skipped Tuesday. On which day does she finish?",
    "Explain photosynthesis. Use simple words! Keep it short. What does a plant need?",
]


def test_incomplete_drops_exactly_one_non_final_sentence():
    prompts = [prompt(i + 1, q) for i, q in enumerate(QUESTIONS)]
    for seed in range(30):
        altered = altered_turns(prompts, "incomplete", PLAIN, seed)
        assert len(altered) == len(prompts)
        for p, text in zip(prompts, altered):
            original = split_sentences(p.question)
            if len(original) < 2:
                assert text is None
                continue
            kept = split_sentences(text)
            assert len(kept) == len(original) - 1
            assert kept[-1] == original[-1]  # the question sentence is kept
            dropped = [
                i for i in range(len(original) - 1) if original[:i] + original[i + 1 :] == kept
            ]
            assert len(dropped) >= 1  # kept == original with one non-final sentence removed
            assert text == " ".join(kept)


def test_incomplete_single_sentence_is_none():
    prompts = [prompt(1, "What is 2 + 2?"), prompt(2, "How many legs does a spider have?")]
    assert altered_turns(prompts, "incomplete", PLAIN, 0) == [None, None]


def test_incomplete_drops_each_non_final_sentence_for_some_seed():
    prompts = [prompt(1, "One. Two. Three. Four?")]
    seen = {altered_turns(prompts, "incomplete", PLAIN, seed)[0] for seed in range(100)}
    assert seen == {"Two. Three. Four?", "One. Three. Four?", "One. Two. Four?"}


def test_incomplete_is_deterministic_and_keeps_context():
    prompts = [prompt(i + 1, q, f"ctx{i}") for i, q in enumerate(QUESTIONS)]
    a = altered_turns(prompts, "incomplete", PLAIN, 5)
    assert a == altered_turns(prompts, "incomplete", PLAIN, 5)
    for i, text in enumerate(a):
        if text is not None:
            assert text.endswith(f" || ctx{i}")
    assert a[2] is None


def test_no_context_removes_the_context():
    prompts = [prompt(1, "Q one. Really?", "likes cats"), prompt(2, "Q two?", "hates noise")]
    assert altered_turns(prompts, "no_context", PLAIN, 0) == ["Q one. Really?", "Q two?"]
    default = DataConfig()
    assert altered_turns(prompts, "no_context", default, 0) == ["Q one. Really?", "Q two?"]


@pytest.mark.parametrize("strategy", ["no_context", "random_context"])
def test_context_strategies_need_a_context_on_every_row(strategy):
    prompts = [prompt(1, "Q1?", "c1"), prompt(2, "Q2?", "c2"), prompt(7, "Q3?"), prompt(9, "Q4?")]
    with pytest.raises(
        UserError, match=rf"p.jsonl:7: pairs.negatives={strategy} .*this one has none"
    ):
        altered_turns(prompts, strategy, PLAIN, 0)


def test_random_context_uses_another_users_context():
    contexts = [f"context number {i}" for i in range(12)]
    prompts = [prompt(i + 1, f"Question {i}?", c) for i, c in enumerate(contexts)]
    for seed in range(20):
        altered = altered_turns(prompts, "random_context", PLAIN, seed)
        used = []
        for i, text in enumerate(altered):
            question, _, ctx = text.partition(" || ")
            assert question == f"Question {i}?"
            assert ctx in contexts
            assert ctx != contexts[i]
            used.append(ctx)
        assert sorted(used) == sorted(contexts)  # a permutation of the contexts


def test_random_context_never_gives_an_identical_context():
    # Two users share a context: neither may get that same context back.
    contexts = ["short", "short", "polite", "numbers", "polite", "verbose"]
    prompts = [prompt(i + 1, f"Q{i}?", c) for i, c in enumerate(contexts)]
    for seed in range(30):
        altered = altered_turns(prompts, "random_context", PLAIN, seed)
        for i, text in enumerate(altered):
            assert text.split(" || ")[1] != contexts[i]


def test_random_context_is_deterministic():
    prompts = [prompt(i + 1, f"Q{i}?", f"c{i}") for i in range(8)]
    assert altered_turns(prompts, "random_context", PLAIN, 3) == altered_turns(
        prompts, "random_context", PLAIN, 3
    )


def test_random_strategy_generates_nothing():
    """`random` pairs answers the model already gave: it alters no prompt to answer again."""
    assert not isinstance(NEGATIVES["random"], Generated)
    assert not hasattr(NEGATIVES["random"], "altered")


# ---------------------------------------------------------------- pair rows


def make_pair(i: int = 0, **kw) -> Pair:
    fields = dict(
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"x{i}"}],
        chosen=f"y+{i}",
        rejected=f"y-{i}",
        prompt_ids=[5, 6, 7 + i],
        chosen_ids=[8, 9, 2],
        rejected_ids=[10 + i, 11],
        negatives="random",
        source=i,
        rejected_source=i + 1,
    )
    fields.update(kw)
    return Pair(**fields)


def test_to_row_official_chat_format():
    pair = make_pair(0, messages=[{"role": "user", "content": "x"}], chosen="good", rejected="bad")
    row = pair.to_row()
    assert row["chosen"] == [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "good"},
    ]
    assert row["rejected"] == [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "bad"},
    ]
    assert row["chosen"][:-1] == row["rejected"][:-1]
    assert "messages" not in row
    assert "reference_logps" not in row and "rejected_prompt" not in row  # None fields are left out
    assert row["prompt_ids"] == [5, 6, 7]
    assert row["chosen_ids"] == [8, 9, 2]
    assert row["rejected_ids"] == [10, 11]
    assert row["negatives"] == "random"
    assert row["source"] == 0 and row["rejected_source"] == 1
    assert row["split"] == "train"
    json.dumps(row)  # JSON-serialisable


def test_to_row_does_not_alias_the_messages():
    pair = make_pair(0)
    row = pair.to_row()
    row["chosen"][0]["content"] = "changed"
    assert pair.messages[0]["content"] == "be brief"


@pytest.mark.parametrize(
    "pair",
    [
        make_pair(0),
        make_pair(3, rejected_source=0),
        make_pair(
            1,
            negatives="incomplete",
            rejected_source=None,
            rejected_prompt="x1 shorter",
            split="valid",
            reference_logps={"chosen": -1.5, "rejected": -20.25},
        ),
    ],
)
def test_row_round_trip(pair):
    assert pair_from_row(pair.to_row(), "f:1") == pair
    assert pair_from_row(json.loads(json.dumps(pair.to_row())), "f:1") == pair


def good_row() -> dict:
    return make_pair(0).to_row()


@pytest.mark.parametrize(
    "key", ["chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids", "negatives", "source"]
)
def test_pair_from_row_missing_key(key):
    row = good_row()
    del row[key]
    with pytest.raises(UserError, match=rf"^pairs.jsonl:4: missing key\(s\) {key};"):
        pair_from_row(row, "pairs.jsonl:4")


def test_pair_from_row_names_all_missing_keys():
    row = good_row()
    del row["source"], row["chosen_ids"]
    with pytest.raises(UserError, match=r"missing key\(s\) chosen_ids, source"):
        pair_from_row(row, "p:1")


def test_pair_from_row_mismatched_prompt_turns():
    row = good_row()
    row["rejected"][1] = {"role": "user", "content": "another prompt"}
    with pytest.raises(
        UserError, match="^p.jsonl:9: 'chosen' and 'rejected' must share the prompt turns"
    ):
        pair_from_row(row, "p.jsonl:9")


@pytest.mark.parametrize(
    "chosen",
    [
        "not a list",
        [{"role": "assistant", "content": "only an answer"}],
        [{"role": "user", "content": "x0"}, {"role": "user", "content": "no assistant"}],
    ],
)
def test_pair_from_row_bad_chosen(chosen):
    row = good_row()
    row["chosen"] = chosen
    if isinstance(chosen, list):
        row["rejected"] = chosen[:-1] + [{"role": "assistant", "content": "r"}]
    with pytest.raises(UserError, match="^p:2: "):
        pair_from_row(row, "p:2")


@pytest.mark.parametrize("key", ["prompt_ids", "chosen_ids", "rejected_ids"])
@pytest.mark.parametrize("value", [[], None, [1, -2], [1, "2"], "123"])
def test_pair_from_row_bad_id_lists(key, value):
    row = good_row()
    row[key] = value
    with pytest.raises(UserError, match=f"^p:3: '{key}' must be a non-empty list of token ids"):
        pair_from_row(row, "p:3")


@pytest.mark.parametrize("ref", [{"chosen": -1.0}, [1.0, 2.0], 3.0])
def test_pair_from_row_bad_reference_logps(ref):
    row = good_row()
    row["reference_logps"] = ref
    with pytest.raises(UserError, match="^p:5: 'reference_logps' must hold"):
        pair_from_row(row, "p:5")


# Malformed final turns must be user errors (one line naming file:line), not tracebacks.
@pytest.mark.parametrize(
    "chosen_last, rejected_last",
    [
        ("plain string", "other string"),  # AttributeError today
        ({"role": "assistant"}, {"role": "assistant", "content": "r"}),  # KeyError today
        ({"role": "assistant", "content": "c"}, "plain string"),  # TypeError today
        ({"role": "assistant", "content": "c"}, {"role": "user", "content": "r"}),  # accepted today
    ],
)
def test_pair_from_row_malformed_final_turn_is_a_user_error(chosen_last, rejected_last):
    row = good_row()
    row["chosen"] = row["chosen"][:-1] + [chosen_last]
    row["rejected"] = row["rejected"][:-1] + [rejected_last]
    with pytest.raises(UserError, match="^p:6: "):
        pair_from_row(row, "p:6")


def test_write_read_pairs_round_trip(tmp_path):
    pairs = [make_pair(i) for i in range(4)]
    pairs[2] = make_pair(
        2,
        negatives="no_context",
        rejected_source=None,
        rejected_prompt="x2",
        reference_logps={"chosen": -3.0, "rejected": -4.5},
        split="valid",
    )
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, pairs)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    assert json.loads(lines[1]) == pairs[1].to_row()
    assert read_pairs(path) == pairs


def test_read_pairs_error_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [make_pair(i).to_row() for i in range(3)]
    rows[1]["chosen_ids"] = []
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"^{path}:2: 'chosen_ids'"):
        read_pairs(path)


def test_read_pairs_missing_file(tmp_path):
    with pytest.raises(UserError, match="pairs file not found"):
        read_pairs(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- split


@pytest.mark.parametrize(
    "n, fraction",
    [(20, 0.05), (20, 0.1), (40, 0.25), (7, 0.5), (10, 0.0), (3, 0.3), (100, 0.05), (13, 0.2)],
)
def test_split_pairs_counts(n, fraction):
    pairs = split_pairs([make_pair(i) for i in range(n)], fraction, seed=42)
    splits = [p.split for p in pairs]
    assert splits.count("valid") == int(round(n * fraction))
    assert splits.count("train") == n - int(round(n * fraction))


def test_split_pairs_deterministic_and_seeded():
    a = [p.split for p in split_pairs([make_pair(i) for i in range(50)], 0.2, seed=1)]
    b = [p.split for p in split_pairs([make_pair(i) for i in range(50)], 0.2, seed=1)]
    c = [p.split for p in split_pairs([make_pair(i) for i in range(50)], 0.2, seed=2)]
    assert a == b
    assert a != c
    assert a.count("valid") == c.count("valid") == 10


def test_split_pairs_resets_earlier_marks():
    pairs = [make_pair(i, split="valid") for i in range(10)]
    split_pairs(pairs, 0.0, seed=0)
    assert [p.split for p in pairs] == ["train"] * 10


def test_split_pairs_keeps_a_training_pair():
    pairs = split_pairs([make_pair(0), make_pair(1)], 0.5, seed=0)
    assert [p.split for p in pairs].count("train") >= 1
