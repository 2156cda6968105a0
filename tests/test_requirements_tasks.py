"""The requirements task family: each checker on written-out answers, well_formed, the
splits, and the templated answers (honoured requirements hold, ignored ones fail)."""

import itertools
import json
import random
from collections import Counter

import pytest

from mipo_mlx.data.tasks.requirements import (
    ADDS_SENTENCE,
    INCOMPATIBLE,
    KINDS,
    MENTION,
    NAMES,
    QUESTIONS,
    RATES,
    SIGNOFF,
    TOPICS,
    WORDS,
    Item,
    Requirement,
    compatible,
    compliance,
    draw_honour,
    item_space,
    items,
    requirements_from_row,
    sentence_count,
    well_formed,
    words,
    write_answer,
)
from mipo_mlx.data.tasks.synthetic import SPLITS, split_of
from mipo_mlx.data.templates import PRISM_WITH_CONTEXT

# kind, value, answers that comply, answers that do not
CASES = [
    (
        "capitals",
        None,
        ["OATMEAL IS GOOD.", "EAT 2 EGGS, THEN REST!  ", "- ANN, TRY TEA\n- HOPE IT HELPS?"],
        ["Oatmeal is good.", "OATMEAL Is GOOD.", "123 456.", "", "OATMEAL IS GOOd"],
    ),
    (
        "dashes",
        None,
        ["- one\n- two", "  - one  \n\n- two\n", "- A\n- B\n- C"],
        ["- one", "- one\n-two", "- one\ntwo", "-\n- two", "one\ntwo", "* one\n* two"],
    ),
    (
        "signoff",
        None,
        ["Rest well. Hope this helps!", "- Rest\n- Hope this helps!  \n", "Rest.Hope this helps!"],
        [
            "Rest well. Hope this helps!!",
            "Rest well. hope this helps!",
            "Hope this helps! Bye.",
            "Rest wellHope this helps!",
            "Hope this helps",
            "HOPE THIS HELPS!",
        ],
    ),
    (
        "mention",
        "garden",
        ["Think of your GARDEN.", "garden, then rest", "Your Garden!"],
        ["Gardens are nice.", "Ask a gardener.", "", "g a r d e n"],
    ),
    (
        "name",
        "Ann",
        ["Ann, rest well.", "REST WELL, ANN.", "Sleep now ann"],
        ["Annabel, rest well.", "Joann should rest.", "A N N", "Anne, hi."],
    ),
    (
        "max_words",
        8,
        [
            "one two three four five six seven eight",
            "- a b c\n- d e f g h",
            "Rest now - then sleep.",
            "",
        ],
        ["one two three four five six seven eight nine", "- a b c d\n- e f g h i"],
    ),
    (
        "sentences",
        2,
        [
            "Rest. Sleep.",
            "Rest! Sleep?",
            "Pay 3.5 dollars. Then rest.",
            "Rest. Then sleep",
            "Dr. Smith came.",
        ],
        ["Rest.", "Rest. Sleep. Eat.", "Wait... what? Fine.", "", "Rest and sleep"],
    ),
    (
        "question",
        None,
        ["Is that fine?", "Want more?  \n", "- Tea\n- What do you think?"],
        ["Is that fine? Okay.", "Why not?!", "", "Is that fine ?."],
    ),
    (
        "no_commas",
        None,
        ["Rest and sleep.", "REST. SLEEP.", "Rest; sleep."],
        ["Rest, sleep.", "a,b", "Well,"],
    ),
]


@pytest.mark.parametrize("kind, value, good, bad", CASES, ids=[case[0] for case in CASES])
def test_checker_on_written_out_answers(kind, value, good, bad):
    requirement = Requirement(kind, value)
    assert [requirement.complies(a) for a in good] == [True] * len(good)
    assert [requirement.complies(a) for a in bad] == [False] * len(bad)


def test_every_kind_has_written_out_cases():
    assert [case[0] for case in CASES] == list(KINDS)
    assert all(len(good) >= 2 and len(bad) >= 2 for _, _, good, bad in CASES)


def test_word_and_sentence_rules():
    assert words("- Ann, try  tea -- now 3 ! ") == ["Ann,", "try", "tea", "now", "3"]
    assert Requirement("max_words", 5).complies("- Ann, try  tea -- now 3 ! ")
    assert not Requirement("max_words", 4).complies("- Ann, try  tea -- now 3 ! ")
    # Abbreviations end a sentence: the rule counts "Dr." as one (the answers use none).
    assert sentence_count("Dr. Smith came.") == 2
    assert not Requirement("sentences", 1).complies("Dr. Smith came.")
    assert sentence_count("It costs 3.5 dollars.") == 1
    assert sentence_count("Rest.\nSleep!\n") == 2
    assert sentence_count("Rest!!! Sleep") == 2
    assert sentence_count("  ") == 0


def test_requirement_texts_and_values():
    assert Requirement("sentences", 1).text == "Answer in exactly 1 sentence."
    assert Requirement("sentences", 2).text == "Answer in exactly 2 sentences."
    assert Requirement("max_words", 10).text == "Use at most 10 words."
    assert Requirement("mention", "pets").text == "Mention the word pets."
    assert Requirement("name", "Omar").text == "Call me by my name, Omar."
    assert Requirement("signoff").text == "End the answer with: Hope this helps!"
    with pytest.raises(ValueError, match="unknown requirement kind"):
        Requirement("shout")
    with pytest.raises(ValueError, match="max_words takes a int"):
        Requirement("max_words", "8")
    with pytest.raises(ValueError, match="capitals takes a NoneType"):
        Requirement("capitals", 1)


def test_well_formed_on_written_out_answers():
    long = "Oatmeal is a good breakfast. " + "Eat more fruit now. " * 14  # 5 + 56 = 61 words
    good = [
        "Oatmeal is a good breakfast.",
        "TRY OATMEAL FOR BREAKFAST.",
        "- Eggs for breakfast\n- Hope this helps!",
        "Aaa, breakfast is good.",  # three in a row is allowed
    ]
    bad = [
        "A SMALLLLL breakfast is good.",
        "Aaaa, breakfast is good.",
        "the the the breakfast is good",
        "Breakfast, breakfast. BREAKFAST is good.",
        "Oatmeal is good.",
        "Breakfasts are good.",
        "",
        "Breakfast now.",
        long,
    ]
    assert [well_formed(a, "breakfast") for a in good] == [True] * len(good)
    assert [well_formed(a, "breakfast") for a in bad] == [False] * len(bad)
    assert well_formed(long.rsplit(" ", 2)[0], "breakfast")  # 59 words


# ---------------------------------------------------------------- data


def test_topic_table():
    assert len(TOPICS) == 16
    questions = [q for topic in TOPICS.values() for q in topic.questions]
    assert len(questions) == len(set(questions)) == 32
    for topic in TOPICS.values():
        assert len(topic.sentences) == 4 and len(topic.short) == 2
        assert all(5 <= len(words(s)) <= 12 for s in topic.sentences), topic.name
        assert all(len(words(s)) <= 4 for s in topic.short), topic.name
        assert well_formed(topic.sentences[0], topic.name) and well_formed(
            topic.short[0], topic.name
        )
        assert "," in " ".join(topic.sentences[:3]), topic.name
        assert all(sentence_count(s) == 1 for s in topic.sentences + topic.short)


def test_no_answer_text_holds_a_word_or_name_by_chance():
    texts = [s for t in TOPICS.values() for s in t.sentences + t.short]
    texts += [*QUESTIONS, SIGNOFF, MENTION.format("x")]
    for value in WORDS + NAMES:
        kind = "mention" if value in WORDS else "name"
        assert not any(Requirement(kind, value).complies(text) for text in texts), value


def test_rates_differ_and_none_is_near_zero():
    assert list(RATES) == list(KINDS)
    assert all(0.15 <= rate <= 0.6 for rate in RATES.values())
    assert len(set(RATES.values())) == 9


# ---------------------------------------------------------------- splits


def _all_items(split):
    return [item for _, group in item_space(split) for item in group]


def test_item_space_size():
    sizes = {s: Counter(len(i.requirements) for i in _all_items(s)) for s in SPLITS}
    assert sizes == {
        "train": {1: 1045, 2: 14910},
        "valid": {1: 156, 2: 1860},
        "heldout": {1: 143, 2: 1758},
    }
    for split in SPLITS:
        assert {r.kind for i in _all_items(split) for r in i.requirements} == set(KINDS)


def test_splits_are_disjoint_by_key_and_by_text():
    drawn = {s: items(s, n, seed=1) for s, n in (("train", 2000), ("valid", 200), ("heldout", 200))}
    for split, batch in drawn.items():
        assert all(split_of(item.key) == split for item in batch)
        assert len(set(batch)) == len({item.key for item in batch}) == len(batch)
    for a, b in itertools.combinations(SPLITS, 2):
        keys = [{i.key for i in _all_items(s)} for s in (a, b)]
        texts = [{(i.question, i.context) for i in _all_items(s)} for s in (a, b)]
        assert not keys[0] & keys[1] and not texts[0] & texts[1]


def test_items_are_reproducible_and_mix_one_and_two_requirements():
    batch = items("train", 2000, seed=3)
    assert batch == items("train", 2000, seed=3)
    assert batch != items("train", 2000, seed=4)
    assert Counter(len(i.requirements) for i in batch) == {1: 1009, 2: 991}
    held = items("heldout", 200, seed=3)
    assert Counter(len(i.requirements) for i in held) == {1: 115, 2: 85}
    assert {r.kind for i in held for r in i.requirements} == set(KINDS)


def test_no_item_holds_an_incompatible_pair():
    for split in SPLITS:
        for item in _all_items(split):
            kinds = [r.kind for r in item.requirements]
            assert kinds == sorted(kinds, key=list(KINDS).index) and len(set(kinds)) == len(kinds)
            if len(kinds) == 2:
                assert frozenset(kinds) not in INCOMPATIBLE
                assert compatible(*item.requirements)
                values = {r.kind: r.value for r in item.requirements}
                assert not (values.get("sentences") == 1 and ADDS_SENTENCE & set(kinds))
    assert not compatible(Requirement("sentences", 1), Requirement("question"))
    assert compatible(Requirement("sentences", 2), Requirement("question"))
    assert not compatible(Requirement("capitals"), Requirement("signoff"))


def test_too_many_items_is_a_clear_error():
    assert len(set(items("heldout", 1901, seed=0))) == 1901  # the whole split
    with pytest.raises(ValueError, match="heldout split holds 1901 distinct requirement items"):
        items("heldout", 1902, seed=0)
    with pytest.raises(ValueError, match="split must be one of"):
        items("test", 5, seed=0)


def test_row_round_trips_and_fills_the_prism_template():
    item = Item("How do I cook rice?", "rice", (Requirement("dashes"), Requirement("name", "Kai")))
    assert item.row() == {
        "prompt": "How do I cook rice?",
        "context": "Give the answer as a list, one point per line, each starting with a dash. "
        "Call me by my name, Kai.",
        "task": "requirements",
        "topic": "rice",
        "requirements": [{"kind": "dashes", "value": None}, {"kind": "name", "value": "Kai"}],
    }
    assert "{" not in PRISM_WITH_CONTEXT.format(prompt=item.question, context=item.context)
    for split in SPLITS:
        for one in _all_items(split)[::7]:
            row = json.loads(json.dumps(one.row()))
            assert requirements_from_row(row) == one.requirements


# ---------------------------------------------------------------- answers


def _subsets(item):
    kinds = [r.kind for r in item.requirements]
    return [set(s) for k in range(len(kinds) + 1) for s in itertools.combinations(kinds, k)]


def test_honoured_requirements_hold_for_every_subset():
    batch = items("train", 600, seed=5)
    for index, item in enumerate(batch):
        for honour in _subsets(item):
            answer = write_answer(item, honour, random.Random(index))
            assert well_formed(answer, item.topic), (item, honour, answer)
            verdicts = compliance(item, answer)
            assert all(ok for r, ok in zip(item.requirements, verdicts) if r.kind in honour), (
                item,
                honour,
                answer,
            )


def test_plain_answers_fail_every_requirement():
    batch = items("train", 2000, seed=6)
    failed, seen = Counter(), Counter()
    for index, item in enumerate(batch):
        answer = write_answer(item, set(), random.Random(index))
        assert well_formed(answer, item.topic) and len(words(answer)) > 12
        for requirement, ok in zip(item.requirements, compliance(item, answer)):
            seen[requirement.kind] += 1
            failed[requirement.kind] += not ok
    assert min(seen.values()) >= 150
    assert {kind: failed[kind] / seen[kind] for kind in KINDS} == dict.fromkeys(KINDS, 1.0)


def test_ignored_requirements_hold_only_where_documented():
    """With the other requirement honoured, an ignored one holds by chance only in the three
    cases the module docstring names."""
    held = Counter()
    for index, item in enumerate(items("train", 2000, seed=7)):
        for ignored, honoured in itertools.permutations(item.requirements, 2):
            answer = write_answer(item, {honoured.kind}, random.Random(index))
            if ignored.complies(answer):
                held[(ignored.kind, honoured.kind, ignored.value)] += 1
    # Always where the docstring says "meets"; for max_words, when the one sentence is short.
    assert held == {
        ("sentences", "max_words", 2): 13,  # of 13 such pairs
        ("no_commas", "max_words", None): 29,  # of 29
        ("max_words", "sentences", 10): 2,  # of 9
        ("max_words", "sentences", 12): 7,  # of 10
    }


def test_answers_differ_only_by_the_transformations():
    item = Item(
        "What helps with a cold?", "cold", (Requirement("capitals"), Requirement("question"))
    )
    for seed in range(20):
        plain = write_answer(item, set(), random.Random(seed))
        assert write_answer(item, {"capitals"}, random.Random(seed)) == plain.upper()
        asked = write_answer(item, {"question": True, "capitals": False}, random.Random(seed))
        assert asked.rsplit(" ", 3)[0] == plain or asked.rsplit(" ", 4)[0] == plain
        assert asked == write_answer(item, {"question"}, random.Random(seed))


def test_written_answer_by_hand():
    item = Item(
        "What is a good breakfast?",
        "breakfast",
        (Requirement("dashes"), Requirement("name", "Mia")),
    )
    answer = write_answer(item, {"dashes", "name"}, random.Random(0))
    first, *_ = answer.splitlines()
    assert first == "- Mia, oatmeal with fruit is a good breakfast, and it is quick."
    short = Item(
        "How do I cook rice?", "rice", (Requirement("max_words", 8), Requirement("signoff"))
    )
    assert write_answer(short, {"max_words", "signoff"}, random.Random(0)) == (
        "Rinse the rice first. Hope this helps!"
    )
    both = Item("How do I cook rice?", "rice", (Requirement("mention", "pets"),))
    assert write_answer(both, {"mention"}, random.Random(0)).endswith(" Think of your pets.")


def test_draw_honour_follows_the_rates():
    item = Item(
        "How do I cook rice?", "rice", (Requirement("capitals"), Requirement("name", "Ben"))
    )
    rng = random.Random(0)
    assert draw_honour(item, rng, dict.fromkeys(KINDS, 1.0)) == {"capitals", "name"}
    assert draw_honour(item, rng, dict.fromkeys(KINDS, 0.0)) == set()
    drawn = Counter(kind for _ in range(4000) for kind in draw_honour(item, rng))
    assert abs(drawn["capitals"] / 4000 - RATES["capitals"]) < 0.03
    assert abs(drawn["name"] / 4000 - RATES["name"]) < 0.03
