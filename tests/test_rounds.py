"""Iterative rounds (training.rounds, beyond the paper): round 2 answers with round 1's
adapters and scores its pairs under that model (its reference), each round's pairs stay in
the run folder, and a run killed inside round 2 resumes to the uninterrupted result."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mipo_mlx.data.pair_file import read_pairs

from .builders import run_args, write_prompts
from .test_score import one_by_one

KILLER = str(Path(__file__).with_name("killer.py"))
ARGS = (
    "--generation.max_tokens 8 --generation.truncated keep --generation.temperature 1.0 "
    "--training.learning_rate 5e-3 --iters 4 --training.batch_size 4 --training.rounds 2 "
    "--training.checkpoint_every 1 --training.save_every 0 --lora.rank 4 --lora.dropout 0.0 "
    "--data.valid_fraction 0.25 --evaluation.max_tokens 6 --evaluation.pmi_negatives 2 "
    "--evaluation.temperature 1.0 --evaluation.plots false"
).split()


def train(*args, killer=None):
    runner = [KILLER, *killer, "--"] if killer else ["-m", "mipo_mlx.train"]
    return subprocess.run(
        [sys.executable, *runner, *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def run(toy_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    prompts = write_prompts(root / "prompts.jsonl", n=12)
    heldout = root / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"prompt": f"Ann has {i} pens. How many?", "answer": str(i)}) + "\n"
            for i in range(4)
        )
    )
    args = lambda out: run_args(toy_model_dir, prompts, out, *ARGS, "--evaluation.prompts", heldout)  # noqa: E731
    done = train(*args(root / "whole"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, args, done


def test_each_rounds_pairs_and_the_table(run):
    root, _, done = run
    out = root / "whole"
    first, second = read_pairs(out / "pairs.jsonl"), read_pairs(out / "round-2" / "pairs.jsonl")
    assert [p.source for p in first] == [p.source for p in second] == list(range(12))
    assert any(a.chosen_ids != b.chosen_ids for a, b in zip(first, second))
    report = json.loads((out / "eval.json").read_text())
    assert list(report) == ["base", "round 1", "round 2"]
    assert "| metric | base | round 1 | round 2 |" in done.stdout
    assert (out / "eval_round-1.json").is_file() and (out / "round-2" / "metrics.jsonl").is_file()


def round_one_model(toy_model_dir, out):
    """The base with round 1's final adapters (its last checkpoint)."""
    from mlx_lm import load

    from mipo_mlx.core.config import LoraConfig
    from mipo_mlx.engine.lora import attach_lora

    model, tokenizer = load(str(toy_model_dir))
    attach_lora(model, LoraConfig(rank=4), seed=0)
    model.load_weights(
        list(mx.load(str(out / "checkpoint" / "adapters.safetensors")).items()), strict=False
    )
    return model, tokenizer


def test_round_two_answers_with_round_one_adapters_and_scores_under_them(run, toy_model_dir):
    """Round 2's chosen answers are what round 1's model samples with the next seed; their
    reference log-probs are that model's; so round 2 starts at loss log 2, margin 0."""
    from mipo_mlx.core.config import GenerationConfig
    from mipo_mlx.engine.generation import generate

    root, _, _ = run
    out = root / "whole"
    model, tokenizer = round_one_model(toy_model_dir, out)
    second = read_pairs(out / "round-2" / "pairs.jsonl")
    config = GenerationConfig(max_tokens=8, truncated="keep", temperature=1.0, seed=43)
    answers = generate(
        model, tokenizer, [p.prompt_ids for p in second], config, streams=list(range(12))
    )
    assert [p.chosen_ids for p in second] == [a.token_ids for a in answers]
    for p in second[:4]:
        assert p.reference_logps["chosen"] == pytest.approx(
            one_by_one(model, p.prompt_ids, p.chosen_ids), abs=1e-3
        )
    rows = [
        json.loads(line) for line in (out / "round-2" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0][
        "rewards/margins"
    ] == pytest.approx(0, abs=1e-5)


@pytest.mark.integration  # a run killed in a process of its own, then resumed
def test_a_run_killed_inside_round_two_resumes_to_the_uninterrupted_result(run):
    root, args, _ = run
    out = root / "killed"
    killed = train(*args(out), killer=["round-2-after-step", "2"])
    assert killed.returncode == -9 and (out / "round-2" / "checkpoint" / "state.json").is_file()
    assert not (out / "eval.json").exists()
    resumed = train("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reusing 12 pairs" in resumed.stderr
    want = {
        k: np.array(v) for k, v in mx.load(str(root / "whole" / "adapters.safetensors")).items()
    }
    got = {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}
    scale = max(np.abs(v).max() for v in want.values())
    assert max(np.abs(got[k] - want[k]).max() for k in want) <= 1e-5 * scale
    a, b = (json.loads((d / "eval.json").read_text()) for d in (root / "whole", out))
    assert [a[m]["answers"] for m in a] == [b[m]["answers"] for m in b]
