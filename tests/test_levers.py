"""The levers for rounds, end to end through the pairs stage and the pipeline on the toy model:
identical pairs dropped, best-of-k chosen by the model's own PMI, majority-vote pairs, the
guard keeping the best round (the base included), and a resume inside a best-of-k round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mipo_mlx.engine.generation as gen
from mipo_mlx.core.config import Config
from mipo_mlx.data.pair_file import read_pairs
from mipo_mlx.engine.generation import STREAM_STRIDE, Response
from mipo_mlx.engine.selection import SAMPLE_STRIDE
from mipo_mlx.stages import guard as grd
from mipo_mlx.stages.answers import pmi_against
from mipo_mlx.stages.pairs import drop_identical

from .builders import made_up_pairs, run_args, write_prompts
from .test_pipeline_pairs import ROWS, build, build_pairs_of, make_config, write_rows
from .test_score import one_by_one

KILLER = str(Path(__file__).with_name("killer.py"))


def scripted(texts_of, tokenizer):
    """A stand-in for generate.generate: the answer to each stream is `texts_of(stream)`,
    encoded, with the stop token."""
    eos = sorted(tokenizer.eos_token_ids)[0]

    def generate(model, tok, prompts, config, streams, on_done=None):
        out = []
        for k, stream in enumerate(streams):
            out.append(Response(tokenizer.encode(texts_of(stream)) + [eos], True))
            if on_done is not None:
                on_done(k, out[-1])
        return out

    return generate


def test_drop_identical_keeps_only_pairs_that_differ():
    pairs = made_up_pairs(5)
    for p, (c, r) in zip(pairs, [("a", "a"), ("a", "b"), ("x", "x"), ("b", "a"), ("q", "r")]):
        p.chosen, p.rejected = c, r
    assert [p.source for p in drop_identical(pairs)] == [1, 3, 4]


def test_identical_pairs_are_dropped_by_the_pairs_stage(toy_model, tmp_path, monkeypatch):
    """no_context negatives that repeat the chosen answer word for word (even rows) make no
    pair; the odd rows' do."""
    model, tokenizer = toy_model

    def text(stream):
        i = stream % STREAM_STRIDE
        negative = stream >= STREAM_STRIDE and i % 2 == 1
        return f"no {i}" if negative else f"yes {i}"

    monkeypatch.setattr(gen, "generate", scripted(text, tokenizer))
    config = make_config(write_rows(tmp_path / "p.jsonl", ROWS), "no_context")
    config.pairs.drop_identical = True
    pairs, _ = build_pairs_of(model, tokenizer, config)
    assert sorted(p.source for p in pairs) == [1, 3, 5]
    config.pairs.drop_identical = False
    pairs, _ = build_pairs_of(model, tokenizer, config)
    assert sorted(p.source for p in pairs) == list(range(6))


def test_majority_vote_pairs_on_constructed_answers(toy_model, tmp_path, monkeypatch):
    """Four answers per prompt (sample j of prompt i from stream i + j * SAMPLE_STRIDE):
    prompt 0 votes 5, 5, 7, none: chosen the first 5, rejected the 7 (the first of the least
    voted); prompt 1 agrees on 3 (no pair); prompt 2 splits 2-2 (no pair); prompt 3 votes B,
    B, B, C."""
    model, tokenizer = toy_model
    votes = {
        0: ["The answer is 5.", "So 5. The answer is 5.", "The answer is 7.", "I am not sure."],
        1: ["The answer is 3."] * 4,
        2: ["The answer is 3.", "The answer is 4.", "The answer is 3.", "The answer is 4."],
        3: ["The answer is: B"] * 3 + ["The answer is: C"],
    }
    monkeypatch.setattr(
        gen,
        "generate",
        scripted(lambda s: votes[s % SAMPLE_STRIDE][s // SAMPLE_STRIDE], tokenizer),
    )
    rows = [{"prompt": f"Question {i}. What is it?"} for i in range(4)]
    config = make_config(write_rows(tmp_path / "p.jsonl", rows), "majority_vote")
    config.pairs.samples, config.data.valid_fraction = 4, 0.0
    pairs, _ = build_pairs_of(model, tokenizer, config)
    got = [(p.source, p.chosen, p.rejected, p.negatives) for p in pairs]
    assert got == [
        (0, "The answer is 5.", "The answer is 7.", "majority_vote"),
        (3, "The answer is: B", "The answer is: C", "majority_vote"),
    ]


def test_best_of_k_chosen_is_the_highest_pmi_sample(toy_model, tmp_path):
    """With pairs.samples = 3, each chosen answer is the one of its prompt's three samples
    with the highest log p(y|x,c) - log p(y|x), each log-prob scored here one at a time."""
    model, tokenizer = toy_model
    config = make_config(write_rows(tmp_path / "p.jsonl", ROWS), "no_context")
    config.pairs.samples = 3
    run = build(model, tokenizer, config)
    pairs, rendered = run.pairs, run.rendered
    calls = [dict(zip(call["streams"], call["responses"])) for call in run.calls]
    against = pmi_against(rendered, tokenizer, config.data, config.pairs.seed)
    picked_other = 0
    for pair in pairs:
        i = pair.source
        samples = [calls[0][i + j * SAMPLE_STRIDE].token_ids for j in range(3)]
        pmi = [
            one_by_one(model, rendered.ids[i], y) - one_by_one(model, against[i], y)
            for y in samples
        ]
        assert pair.chosen_ids == samples[int(np.argmax(pmi))]
        picked_other += int(np.argmax(pmi)) != 0
    assert picked_other  # not always the first sample


def test_guard_keeps_the_best_round_and_says_so_when_the_base_is(
    toy_model_dir, tmp_path, monkeypatch
):
    """Valid scores are set per call (base, round 1, round 2). The run folder's adapters are
    then the kept round's (round-<k>/'s), or zero when the base is best, and the run says so."""
    from mipo_mlx.pipeline import run

    prompts = write_prompts(tmp_path / "p.jsonl", n=8)
    valid = tmp_path / "valid.jsonl"
    valid.write_text(
        "".join(json.dumps({"prompt": f"{i} + 1?", "answer": "1"}) + "\n" for i in range(4))
    )

    def go(scores, name, keep="best"):
        given = iter(scores)
        monkeypatch.setattr(grd, "round_score", lambda result, labels: next(given))
        config = Config()
        config.model.path, config.data.prompts = str(toy_model_dir), str(prompts)
        config.output.dir, config.guard.prompts = str(tmp_path / name), str(valid)
        config.guard.keep = keep
        g, t = config.generation, config.training
        g.max_tokens, g.truncated, g.temperature = 6, "keep", 1.0
        t.rounds, t.iters, t.batch_size, t.learning_rate = 2, 2, 4, 5e-3
        config.evaluation.max_tokens = 4
        result = run(config)
        kept = {
            k: np.array(v) for k, v in mx.load(str(result.output / "adapters.safetensors")).items()
        }
        return result, kept

    def round_weights(out, k):
        return {
            k_: np.array(v)
            for k_, v in mx.load(str(out / f"round-{k}" / "adapters.safetensors")).items()
        }

    result, kept = go([0.2, 0.5, 0.4], "one")
    assert result.guard.startswith("kept round 1, the best on valid")
    assert json.loads((result.output / "guard.json").read_text())["kept"] == "round 1"
    want = round_weights(result.output, 1)
    assert all(np.array_equal(kept[k], want[k]) for k in want)
    assert any(not np.array_equal(want[k], round_weights(result.output, 2)[k]) for k in want)

    result, kept = go([0.5, 0.5, 0.4], "base")
    assert result.guard.startswith("no round beat the base on valid")
    assert all(not v.any() for v in kept.values())

    result, kept = go([0.5, 0.5, 0.4], "last", keep="last")
    want = round_weights(result.output, 2)
    assert all(np.array_equal(kept[k], want[k]) for k in want)
    assert result.guard.startswith("guard off")


def test_best_round_prefers_the_earlier_on_a_tie():
    assert grd.best_round([0.3, 0.3, 0.2]) == 0
    assert grd.best_round([0.1, 0.4, 0.4, 0.2]) == 1
    assert grd.best_round([0.1, 0.2, 0.3]) == 2


@pytest.mark.integration  # a run killed in a process of its own, then resumed
def test_a_run_killed_inside_a_best_of_k_round_resumes_to_the_uninterrupted_result(
    toy_model_dir, tmp_path
):
    """Killed after 20 of the 36 samples (12 prompts x 3) of round 1; the resumed run keeps the
    saved samples, draws the rest from their own streams, and ends with the same pairs,
    adapters and table as a run never killed."""
    prompts = write_prompts(tmp_path / "p.jsonl", n=12)
    args = lambda out: run_args(  # noqa: E731
        toy_model_dir,
        prompts,
        out,
        *(
            "--generation.max_tokens 8 --generation.truncated keep --generation.temperature 1.0 "
            "--pairs.samples 3 --training.learning_rate 5e-3 --iters 3 --training.batch_size 4 "
            "--training.checkpoint_every 1 --lora.rank 4 --data.valid_fraction 0.25 "
            "--training.nll_weight 0.5"
        ).split(),
    )
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, *a], capture_output=True, text=True, timeout=300
    )
    whole = run("-m", "mipo_mlx.train", *args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run(KILLER, "after-responses", "20", "--", *args(tmp_path / "killed"))
    assert killed.returncode == -9
    saved = (tmp_path / "killed" / "responses.chosen.jsonl").read_text().splitlines()
    assert len(saved) == 20 and not (tmp_path / "killed" / "pairs.jsonl").exists()
    resumed = run("-m", "mipo_mlx.train", "--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (read_pairs(tmp_path / d / "pairs.jsonl") for d in ("whole", "killed"))
    assert [p.to_row() for p in a] == [p.to_row() for p in b]
    want, got = (
        {k: np.array(v) for k, v in mx.load(str(tmp_path / d / "adapters.safetensors")).items()}
        for d in ("whole", "killed")
    )
    scale = max(np.abs(v).max() for v in want.values())
    assert max(np.abs(got[k] - want[k]).max() for k in want) <= 1e-5 * scale


def test_fresh_prompts_give_each_round_its_own_block(toy_model_dir, tmp_path):
    """12 prompts, data.limit 6, 2 rounds: round 1 answers the first 6, round 2 the next 6."""
    from mipo_mlx.pipeline import run

    prompts = write_prompts(tmp_path / "p.jsonl", n=12)
    config = Config()
    config.model.path, config.data.prompts = str(toy_model_dir), str(prompts)
    config.output.dir, config.data.limit = str(tmp_path / "out"), 6
    config.generation.max_tokens, config.generation.truncated = 6, "keep"
    config.generation.temperature = 1.0
    t = config.training
    t.rounds, t.fresh_prompts, t.iters, t.batch_size = 2, True, 1, 2
    result = run(config)
    cases = [
        sorted(p.messages[-1]["content"].rsplit("Case ", 1)[1] for p in read_pairs(path))
        for path in (result.output / "pairs.jsonl", result.output / "round-2" / "pairs.jsonl")
    ]
    assert cases == [[f"{i}." for i in range(6)], sorted(f"{i}." for i in range(6, 12))]


def test_fresh_prompts_need_enough_rows(toy_model_dir, tmp_path):
    from mipo_mlx.core.errors import UserError
    from mipo_mlx.pipeline import run

    config = Config()
    config.model.path = str(toy_model_dir)
    config.data.prompts = str(write_prompts(tmp_path / "p.jsonl", n=10))
    config.output.dir, config.data.limit = str(tmp_path / "out"), 6
    config.training.rounds, config.training.fresh_prompts = 2, True
    with pytest.raises(UserError, match="10 prompts; training.fresh_prompts gives each of the 2"):
        run(config)
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_majority_vote_runs_through_the_pipeline(toy_model_dir, tmp_path):
    """pairs.negatives=majority_vote as a user runs it: prompts without a context are fine (the
    pre-flight checks know it generates from x itself), and the run writes its pairs."""
    from mipo_mlx.pipeline import run

    rows = [{"prompt": f"Tom has {i} apples. He buys 2 more. How many?"} for i in range(10)]
    config = Config()
    config.model.path = str(toy_model_dir)
    config.data.prompts = write_rows(tmp_path / "p.jsonl", rows)
    config.output.dir = str(tmp_path / "out")
    config.pairs.negatives, config.pairs.samples = "majority_vote", 4
    g = config.generation
    g.max_tokens, g.truncated, g.temperature = 8, "keep", 1.5
    config.training.iters, config.training.batch_size = 1, 1
    config.data.valid_fraction = 0.0
    try:
        result = run(config)
    except Exception as err:  # only the vote may find no pair on a random toy model
        assert "no prompt's answers had a majority result" in str(err)
        return
    assert {p.negatives for p in read_pairs(result.output / "pairs.jsonl")} == {"majority_vote"}
