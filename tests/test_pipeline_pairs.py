"""Every negative strategy end to end through the pairs stage (`pairs.make_pairs`), on the toy
model."""

from __future__ import annotations

import json
import tempfile

import pytest

import mipo_mlx.engine.generation as gen
from mipo_mlx.core.config import Config
from mipo_mlx.core.errors import UserError
from mipo_mlx.data.prompts import (
    read_prompts,
    read_source,
    render,
    render_prompts,
    split_sentences,
    user_text,
)
from mipo_mlx.engine.generation import Response, decode, usable
from mipo_mlx.stages.negatives import NEGATIVES
from mipo_mlx.stages.pairs import make_pairs
from mipo_mlx.stages.run import Run as StageRun
from mipo_mlx.stages.run_folder import RunFolder

ROWS = [
    {
        "prompt": "Tom has 3 apples. He buys 4 more. How many apples does he have?",
        "context": "Answer in one line.",
    },
    {
        "prompt": (
            "A train leaves at noon. It goes 60 km per hour. It stops once. How far is it at 3 pm?"
        ),
        "context": "Be very polite.",
    },
    {
        "prompt": "Sara reads 10 pages a day. The book has 100 pages. When does she finish?",
        "context": "Use numbers only.",
    },
    {
        "prompt": "Which planet is red? Choices: A) Mars B) Venus. Pick one letter.",
        "context": "Explain like I am five.",
    },
    {
        "prompt": "The quick brown fox jumps. The dog is lazy. Who jumps?",
        "context": "Reply in French.",
    },
    {
        "prompt": "Ann has 5 coins. Bob has 2 coins. Ann gives Bob one coin. How many has Bob?",
        "context": "Show every step.",
    },
]
STRATEGIES = ["random", "incomplete", "no_context", "random_context"]


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make_config(prompts: str, negatives: str = "random", **generation) -> Config:
    config = Config()
    config.data.prompts = prompts
    config.pairs.negatives = negatives
    config.pairs.seed = 3
    g = config.generation
    g.max_tokens, g.truncated, g.temperature, g.top_p, g.batch_size, g.seed = (
        12,
        "keep",
        1.0,
        0.9,
        4,
        5,
    )
    for k, v in generation.items():
        setattr(g, k, v)
    return config


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", ROWS)


def build_pairs_of(model, tokenizer, config: Config):
    """The pairs stage on the config's prompt file, as the pipeline runs it: (pairs, rendered)."""
    rendered = render_prompts(
        read_source(config.data.prompts), tokenizer, config.data, config.data.prompts
    )
    run = StageRun(config, RunFolder(tempfile.mkdtemp()), model, tokenizer)
    return make_pairs(run, rendered), rendered


class Run:
    def __init__(self, pairs, rendered, calls, config):
        self.pairs, self.rendered, self.calls, self.config = pairs, rendered, calls, config


def build(model, tokenizer, config: Config) -> Run:
    """make_pairs with every call to generate recorded (prompts, streams, responses)."""
    real = gen.generate
    calls = []

    def spy(model, tokenizer, prompts, gen_config, streams, on_done=None):
        out = real(model, tokenizer, prompts, gen_config, streams, on_done)
        calls.append(
            {"prompts": [list(p) for p in prompts], "streams": list(streams), "responses": out}
        )
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(gen, "generate", spy)
    try:
        pairs, rendered = build_pairs_of(model, tokenizer, config)
    finally:
        mp.undo()
    return Run(pairs, rendered, calls, config)


@pytest.fixture(scope="module")
def runs(toy_model, prompts_file):
    model, tokenizer = toy_model
    return {s: build(model, tokenizer, make_config(prompts_file, s)) for s in STRATEGIES}


def original_ids(tokenizer, row, config) -> list[int]:
    text = user_text(row["prompt"], row["context"], config.data)
    return render(tokenizer, [{"role": "user", "content": text}], False)


# ---------------------------------------------------------------- random


def test_random_one_generation_pass(runs):
    run = runs["random"]
    assert len(run.calls) == 1
    assert run.calls[0]["streams"] == list(range(len(ROWS)))


def test_random_pairs_structure(runs, toy_model):
    _, tokenizer = toy_model
    run = runs["random"]
    positives = run.calls[0]["responses"]
    assert [p.source for p in run.pairs] == list(range(len(ROWS)))  # truncated="keep": all kept
    assert sorted(p.rejected_source for p in run.pairs) == list(range(len(ROWS)))  # a derangement
    for i, pair in enumerate(run.pairs):
        j = pair.rejected_source
        assert j != pair.source
        assert pair.negatives == "random"
        assert pair.rejected_prompt is None
        assert pair.chosen_ids == positives[i].token_ids
        assert pair.rejected_ids == run.pairs[j].chosen_ids == positives[j].token_ids
        assert pair.chosen == decode(tokenizer, positives[i])
        assert pair.rejected == run.pairs[j].chosen
        # both are scored under this pair's own prompt
        assert pair.prompt_ids == original_ids(tokenizer, ROWS[i], run.config)
        assert pair.prompt_ids == run.calls[0]["prompts"][i]
        text = user_text(ROWS[i]["prompt"], ROWS[i]["context"], run.config.data)
        assert pair.messages == [{"role": "user", "content": text}]


def test_random_pair_rows_are_official_format(runs):
    for pair in runs["random"].pairs:
        row = pair.to_row()
        assert row["chosen"][:-1] == row["rejected"][:-1] == pair.messages
        assert row["chosen"][-1] == {"role": "assistant", "content": pair.chosen}
        assert row["rejected"][-1] == {"role": "assistant", "content": pair.rejected}


def test_random_is_deterministic(runs, toy_model, prompts_file):
    model, tokenizer = toy_model
    again = build(model, tokenizer, make_config(prompts_file, "random"))
    assert [p.to_row() for p in again.pairs] == [p.to_row() for p in runs["random"].pairs]


def test_random_never_pairs_duplicate_prompts(toy_model, tmp_path):
    model, tokenizer = toy_model
    rows = [{"prompt": "Same question. Really?"}] * 3 + [
        {"prompt": f"Other {i}. Why?"} for i in range(4)
    ]
    config = make_config(write_rows(tmp_path / "dup.jsonl", rows), "random")
    for seed in range(5):
        config.pairs.seed = seed
        pairs, _ = build_pairs_of(model, tokenizer, config)
        for pair in pairs:
            assert pair.rejected_source != pair.source
            assert not (pair.source < 3 and pair.rejected_source < 3)


# ---------------------------------------------------------------- generated negatives


@pytest.mark.parametrize("strategy", ["incomplete", "no_context", "random_context"])
def test_generated_strategies(runs, toy_model, prompts_file, strategy):
    _, tokenizer = toy_model
    run = runs[strategy]
    config = run.config
    assert len(run.calls) == 2  # positives, then negatives
    # the negatives sample from their own random streams, not the positives' ones
    assert not set(run.calls[1]["streams"]) & set(run.calls[0]["streams"])
    positives, negatives = run.calls[0]["responses"], run.calls[1]["responses"]
    # same seed, same positives as the random strategy
    assert [r.token_ids for r in positives] == [
        r.token_ids for r in runs["random"].calls[0]["responses"]
    ]

    expected = NEGATIVES[strategy].altered(
        read_prompts(prompts_file), config.data, config.pairs.seed
    )
    todo = [i for i, text in enumerate(expected) if text is not None]
    assert [p.source for p in run.pairs] == todo
    assert len(run.calls[1]["prompts"]) == len(todo)
    random_by_source = {p.source: p for p in runs["random"].pairs}
    for k, pair in enumerate(run.pairs):
        i = pair.source
        assert pair.negatives == strategy
        assert pair.rejected_source is None
        assert pair.rejected_prompt == expected[i]
        assert pair.rejected_prompt != pair.messages[-1]["content"]
        # the prompt is the original one; the negative was generated from the altered one
        assert pair.prompt_ids == original_ids(tokenizer, ROWS[i], config)
        assert pair.prompt_ids == random_by_source[i].prompt_ids
        assert pair.chosen_ids == random_by_source[i].chosen_ids
        assert pair.chosen == random_by_source[i].chosen
        altered_ids = render(tokenizer, [{"role": "user", "content": expected[i]}], False)
        assert run.calls[1]["prompts"][k] == altered_ids
        assert pair.rejected_ids == negatives[k].token_ids
        assert pair.rejected == decode(tokenizer, negatives[k])


def test_incomplete_rejected_prompt(runs):
    run = runs["incomplete"]
    assert len(run.pairs) == len(ROWS)  # every row has at least two sentences
    for pair in run.pairs:
        row = ROWS[pair.source]
        question, _, context = pair.rejected_prompt.partition("\n\nPlease respect")
        assert context.endswith(row["context"])  # the context stays
        original, kept = split_sentences(row["prompt"]), split_sentences(question)
        assert len(kept) == len(original) - 1
        assert kept[-1] == original[-1]


def test_no_context_rejected_prompt(runs):
    for pair in runs["no_context"].pairs:
        assert pair.rejected_prompt == ROWS[pair.source]["prompt"]


def test_random_context_rejected_prompt(runs):
    contexts = [r["context"] for r in ROWS]
    used = []
    for pair in runs["random_context"].pairs:
        row = ROWS[pair.source]
        prefix = row["prompt"] + "\n\nPlease respect the following requirements made by the user: "
        assert pair.rejected_prompt.startswith(prefix)
        context = pair.rejected_prompt[len(prefix) :]
        assert context in contexts and context != row["context"]
        used.append(context)
    assert sorted(used) == sorted(contexts)


def test_incomplete_skips_single_sentence_prompts(toy_model, tmp_path):
    model, tokenizer = toy_model
    rows = [
        {"prompt": "One sentence only?"},
        {"prompt": "First part. Second part?"},
        {"prompt": "Just this?"},
        {"prompt": "A. B. C?"},
    ]
    config = make_config(write_rows(tmp_path / "p.jsonl", rows), "incomplete")
    pairs, _ = build_pairs_of(model, tokenizer, config)
    assert [p.source for p in pairs] == [1, 3]
    assert pairs[0].rejected_prompt == "Second part?"


def test_incomplete_nothing_to_drop_raises(toy_model, tmp_path):
    model, tokenizer = toy_model
    config = make_config(
        write_rows(tmp_path / "p.jsonl", [{"prompt": "Why?"}, {"prompt": "How?"}]), "incomplete"
    )
    with pytest.raises(UserError, match="no prompt can be altered"):
        build_pairs_of(model, tokenizer, config)


def test_context_strategy_without_context_names_the_line(toy_model, tmp_path):
    model, tokenizer = toy_model
    rows = [ROWS[0], ROWS[1], {"prompt": "No context here. Why?"}]
    config = make_config(write_rows(tmp_path / "p.jsonl", rows), "no_context")
    with pytest.raises(
        UserError,
        match=r"p.jsonl:3: pairs.negatives=no_context needs a .context. on every prompt row; "
        r"this one has none",
    ):
        build_pairs_of(model, tokenizer, config)


# ---------------------------------------------------------------- the truncation rule


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_keep_keeps_unfinished_responses_without_eos(runs, toy_model, strategy):
    _, tokenizer = toy_model
    eos = tokenizer.eos_token_ids
    run = runs[strategy]
    responses = [r for call in run.calls for r in call["responses"]]
    unfinished = [r for r in responses if not r.finished]
    # max_tokens=12: most answers of the random-init model do not finish (how many depends
    # on the draws: 5 for `random` here); enough of them for the checks below to bite
    assert len(unfinished) >= len(ROWS) // 2
    kept_ids = [p.chosen_ids for p in run.pairs] + [p.rejected_ids for p in run.pairs]
    for r in unfinished:
        assert len(r.token_ids) == 12
        assert not any(t in eos for t in r.token_ids)
        assert r.token_ids in kept_ids
    for pair in run.pairs:
        for ids in (pair.chosen_ids, pair.rejected_ids):
            assert ids[-1] not in eos or len(ids) < 12


def test_usable():
    config = Config()
    config.generation.truncated = "drop"
    assert usable(Response([1, 2], True), config.generation) is True
    assert usable(Response([1, 2], False), config.generation) is False
    config.generation.truncated = "keep"
    assert usable(Response([1, 2], False), config.generation) is True


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_drop_with_nothing_finished_raises(toy_model, prompts_file, strategy):
    model, tokenizer = toy_model
    config = make_config(prompts_file, strategy, max_tokens=1, truncated="drop")
    with pytest.raises(UserError):
        build_pairs_of(model, tokenizer, config)


def test_drop_random_error_names_max_tokens(toy_model, prompts_file):
    model, tokenizer = toy_model
    config = make_config(prompts_file, "random", max_tokens=1, truncated="drop")
    with pytest.raises(
        UserError, match=r"only 0 response\(s\) finished within generation.max_tokens=1"
    ):
        build_pairs_of(model, tokenizer, config)


@pytest.mark.parametrize("strategy", ["incomplete", "no_context", "random_context"])
def test_drop_generated_error_points_at_max_tokens(toy_model, prompts_file, strategy):
    # When every positive was dropped by the truncation rule, the message must say so
    # (raise generation.max_tokens / truncated=keep), not blame the prompts.
    model, tokenizer = toy_model
    config = make_config(prompts_file, strategy, max_tokens=1, truncated="drop")
    with pytest.raises(UserError, match="max_tokens"):
        build_pairs_of(model, tokenizer, config)


def test_drop_removes_unfinished_pairs(toy_model, prompts_file, monkeypatch):
    # Make prompts 1 and 4 "finish" (their responses end with EOS) and drop the rest.
    model, tokenizer = toy_model
    eos = next(iter(tokenizer.eos_token_ids))
    real = gen.generate

    def fake(model, tokenizer, prompts, config, streams, on_done=None):
        out = real(model, tokenizer, prompts, config, streams, on_done)
        return [
            Response(r.token_ids[:3] + [eos], True) if s in (1, 4) else Response(r.token_ids, False)
            for r, s in zip(out, streams)
        ]

    monkeypatch.setattr(gen, "generate", fake)
    config = make_config(prompts_file, "random", truncated="drop")
    pairs, _ = build_pairs_of(model, tokenizer, config)
    assert sorted((p.source, p.rejected_source) for p in pairs) == [(1, 4), (4, 1)]
    for pair in pairs:
        assert pair.chosen_ids[-1] == eos and len(pair.chosen_ids) == 4
        assert pair.chosen == tokenizer.decode(pair.chosen_ids[:-1])


# ---------------------------------------------------------------- mixed

MIXED = [ROWS[0], {"prompt": "What is 7 + 5?"}, ROWS[1], {"prompt": "Ben has 2 pens. How many?"},
         ROWS[2], {"prompt": "Which is larger, 4 or 9?"}]  # fmt: skip


def test_mixed_picks_each_rows_strategy(toy_model, tmp_path):
    """Rows with a context (0, 2, 4) get a `no_context` negative, generated from the prompt
    without it; the others (1, 3, 5) a `random` negative: the answer to another row without a
    context. One generation for the positives, one for the three no-context prompts only."""
    model, tokenizer = toy_model
    config = make_config(write_rows(tmp_path / "mixed.jsonl", MIXED), "mixed")
    run = build(model, tokenizer, config)
    assert [p.source for p in run.pairs] == [0, 1, 2, 3, 4, 5]
    assert [p.negatives for p in run.pairs] == ["no_context", "random"] * 3
    assert len(run.calls) == 2 and run.calls[1]["streams"] == [
        gen.STREAM_STRIDE + k for k in range(3)
    ]
    negatives = run.calls[1]["responses"]
    for k, pair in enumerate(p for p in run.pairs if p.negatives == "no_context"):
        assert pair.rejected_prompt == user_text(MIXED[pair.source]["prompt"], None, config.data)
        assert pair.rejected_ids == negatives[k].token_ids
        assert pair.rejected_source is None
    positives = run.calls[0]["responses"]
    plain = [p for p in run.pairs if p.negatives == "random"]
    assert sorted(p.rejected_source for p in plain) == [1, 3, 5]  # a derangement among them
    for pair in plain:
        assert pair.rejected_source != pair.source and pair.rejected_prompt is None
        assert pair.rejected_ids == positives[pair.rejected_source].token_ids
        assert (
            pair.prompt_ids == run.calls[0]["prompts"][pair.source]
        )  # scored under its own prompt


def test_mixed_on_one_family_is_that_familys_strategy(toy_model, tmp_path, prompts_file):
    model, tokenizer = toy_model
    with_context = build(model, tokenizer, make_config(prompts_file, "mixed"))
    assert {p.negatives for p in with_context.pairs} == {"no_context"}
    plain = write_rows(tmp_path / "plain.jsonl", [m for m in MIXED if "context" not in m])
    assert {p.negatives for p in build(model, tokenizer, make_config(plain, "mixed")).pairs} == {
        "random"
    }


def test_mixed_needs_two_rows_without_context(toy_model, tmp_path):
    from mipo_mlx.stages.pairs import check_pairs_possible

    _, tokenizer = toy_model
    config = make_config(write_rows(tmp_path / "one.jsonl", MIXED[:3]), "mixed")
    rendered = render_prompts(read_source(config.data.prompts), tokenizer, config.data, "one.jsonl")
    with pytest.raises(UserError, match=r"1 prompt\(s\): a random negative needs at least 2"):
        check_pairs_possible(rendered, config.pairs, config.data)
