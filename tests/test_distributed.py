"""Data-parallel runs with MLX's ring backend: 2 processes on this machine over loopback
(`mlx.launch -n 2 --backend ring`) give the pairs and the adapters of one process with
the same global batch, over two rounds (training.rounds); a rank that dies stops the other
with a message, and the run resumes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from .builders import run_args, write_prompts

KILLER = str(Path(__file__).with_name("killer.py"))
ARGS = (
    "--generation.max_tokens 10 --generation.truncated keep --generation.temperature 1.0 "
    "--training.learning_rate 3e-3 --iters 8 --training.checkpoint_every 3 "
    "--training.save_every 0 --lora.rank 4 --lora.dropout 0.0 --data.valid_fraction 0.2 "
    "--training.valid_every 4 --training.length_buckets 2 --training.rounds 2"
).split()

pytestmark = [  # two ranks under mlx.launch, each a process of its own
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not on PATH"),
]


def launch(n, *args, killer=None, timeout=300):
    runner = [sys.executable, *(killer or ["-m", "mipo_mlx.train"])]
    cmd = (
        [shutil.which("mlx.launch"), "-n", str(n), "--backend", "ring", *runner]
        if n > 1
        else runner
    )
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


def train_args(model_dir, prompts, out, batch):
    return run_args(model_dir, prompts, out, "--training.batch_size", batch, *ARGS)


def adapters(out):
    return {k: np.array(v) for k, v in mx.load(str(Path(out) / "adapters.safetensors")).items()}


def pair_rows(out):
    return [json.loads(line) for line in (Path(out) / "pairs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(toy_model_dir, tmp_path_factory):
    """One process with batch 4, and 2 ranks with batch 2 each (global batch 4), same seed; the
    2-rank run also evaluates before and after training (which changes no pair or weight)."""
    tmp = tmp_path_factory.mktemp("dist")
    prompts = write_prompts(tmp / "prompts.jsonl", n=20)
    rows = [
        {"prompt": f"Tom has {i} apples and buys {i + 1} more. How many?", "answer": str(2 * i + 1)}
        for i in range(6)
    ]
    (tmp / "heldout.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    single = launch(1, *train_args(toy_model_dir, prompts, tmp / "one", 4))
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch(2, *eval_args(toy_model_dir, prompts, tmp / "heldout.jsonl", tmp / "two"))
    assert double.returncode == 0 and "Traceback" not in double.stderr, double.stderr[-3000:]
    return tmp, prompts, single, double


def test_two_ranks_make_the_pairs_of_one(runs):
    tmp, _, _, _ = runs
    one = pair_rows(tmp / "one") + pair_rows(tmp / "one" / "round-2")
    two = pair_rows(tmp / "two") + pair_rows(tmp / "two" / "round-2")
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        # the derangement spans all prompts: same sources, same token ids, same split
        for key in ("prompt_ids", "chosen_ids", "rejected_ids", "split", "rejected_source"):
            assert a.get(key) == b.get(key), key
        for side in ("chosen", "rejected"):
            assert a["reference_logps"][side] == pytest.approx(b["reference_logps"][side], abs=1e-4)


def test_two_ranks_train_the_adapters_of_one(runs):
    tmp, _, _, _ = runs
    one, two = adapters(tmp / "one"), adapters(tmp / "two")
    assert one.keys() == two.keys()
    scale = max(np.abs(v).max() for v in one.values())
    gap = max(np.abs(one[k] - two[k]).max() for k in one)
    assert gap <= 1e-3 * scale, (gap, scale)
    steps = [
        json.loads(line)["step"]
        for line in (tmp / "two" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 9))  # rank 0 alone logs, once per step


def test_only_rank_zero_writes_and_prints(runs):
    _, _, single, double = runs
    assert double.stderr.count("wrote ") == 2  # the pairs line of each round, from rank 0 only
    assert double.stdout.count("done:") == 1


def eval_args(model_dir, prompts, heldout, out):
    """A 2-rank run that also evaluates on `heldout`, before and after training."""
    return [
        *train_args(model_dir, prompts, out, 2),
        "--evaluation.prompts",
        str(heldout),
        "--evaluation.max_tokens",
        "6",
        "--evaluation.pmi_negatives",
        "2",
        "--evaluation.temperature",
        "1.0",
        "--evaluation.plots",
        "false",
    ]


def test_a_dying_rank_stops_the_other_and_the_run_resumes_to_the_same_result(runs, toy_model_dir):
    """Evaluation before and after training, on 2 ranks. Rank 1 is killed after step 5: rank 0
    stops with one line and keeps the step-3 checkpoint, and its folder holds eval_base.json.
    On --resume rank 0 decides to reuse that file and every rank follows (before, rank 1
    recomputed it while rank 0 read it, and their collectives fell out of step); the result
    equals the uninterrupted run's. mlx.launch exits 0 even when a rank fails, so the ranks'
    output and the files written are read, not only the exit status."""
    tmp, prompts, _, _ = runs
    out = tmp / "killed"
    args = eval_args(toy_model_dir, prompts, tmp / "heldout.jsonl", out)
    killed = launch(2, "rank-1-after-step", "5", "--", *args, killer=[KILLER])
    assert "Traceback" not in killed.stderr
    assert "another rank stopped" in killed.stderr, killed.stderr[-2000:]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    assert (out / "eval_base.json").is_file() and not (out / "eval.json").exists()
    resumed = launch(2, "--resume", str(out))
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert resumed.stdout.count("done:") == 1 and "| PMI (nats) |" in resumed.stdout
    want, got = (json.loads((d / "eval.json").read_text()) for d in (tmp / "two", out))
    assert list(got) == list(want) == ["base", "round 1", "round 2"]
    for model in want:
        assert got[model]["answers"] == want[model]["answers"]
        for key in ("accuracy", "pmi_mean", "length_mean", "distinct_2"):
            assert got[model][key] == pytest.approx(want[model][key], abs=1e-4), (model, key)
    final, reference = adapters(out), adapters(tmp / "two")
    scale = max(np.abs(v).max() for v in reference.values())
    assert max(np.abs(final[k] - reference[k]).max() for k in reference) <= 1e-5 * scale
