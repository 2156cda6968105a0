"""End to end: a model folder on disk -> `python -m mipo_mlx.train` -> adapters mlx-lm loads."""

import json
import math
import subprocess
import sys

import mlx.core as mx
import pytest
import yaml

from mipo_mlx.core.settings import from_dict
from mipo_mlx.data.pair_file import read_pairs
from mipo_mlx.engine.batching import pack_pairs
from mipo_mlx.engine.logps import pair_logps

from .builders import write_prompts
from .test_score import one_by_one

ARGS = (
    "--generation.max_tokens 12 --generation.truncated keep --generation.temperature 1.0 "
    "--training.learning_rate 2e-3 --training.epochs 6 --training.batch_size 4 "
    "--training.save_every 10 --lora.rank 4 --data.valid_fraction 0.1"
).split()


@pytest.fixture(scope="module")
def run_dir(toy_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    prompts = write_prompts(root / "prompts.jsonl", n=20)
    out = root / "out"
    cmd = [
        sys.executable,
        "-m",
        "mipo_mlx.train",
        "--model",
        str(toy_model_dir),
        "--prompts",
        str(prompts),
        "--output",
        str(out),
        *ARGS,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "done: 20 pairs" in done.stdout
    return out


def test_outputs_written(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "adapters.safetensors",
        "adapter_config.json",
        "config.yaml",
        "pairs.jsonl",
        "metrics.jsonl",
    } <= names
    assert "0000010_adapters.safetensors" in names  # save_every 10
    assert not [n for n in names if n.endswith(".tmp")]


def test_config_yaml_is_the_resolved_config(run_dir, toy_model_dir):
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), "config.yaml")
    assert config.model.path == str(toy_model_dir)
    assert config.training.learning_rate == 2e-3 and config.training.epochs == 6
    assert config.generation.truncated == "keep" and config.lora.rank == 4
    assert config.training.beta == 0.1  # untouched default


def test_reference_logps_equal_fresh_base_scoring(run_dir, toy_model):
    model, _ = toy_model  # a fresh load of the base model: no adapters
    pairs = read_pairs(run_dir / "pairs.jsonl")
    assert len(pairs) == 20 and sum(p.split == "valid" for p in pairs) == 2
    for p in pairs[:6]:
        assert p.reference_logps["chosen"] == pytest.approx(
            one_by_one(model, p.prompt_ids, p.chosen_ids), abs=1e-3
        )
        assert p.reference_logps["rejected"] == pytest.approx(
            one_by_one(model, p.prompt_ids, p.rejected_ids), abs=1e-3
        )


def test_random_negatives_are_other_prompts_answers(run_dir):
    pairs = read_pairs(run_dir / "pairs.jsonl")
    by_source = {p.source: p for p in pairs}
    for p in pairs:
        assert p.rejected_source != p.source
        assert p.rejected_ids == by_source[p.rejected_source].chosen_ids
        assert p.negatives == "random"


def test_margin_rises_from_zero(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert sum(r["rewards/margins"] for r in rows[-5:]) / 5 > 0.2
    for r in rows:  # TRL's relations between the logged values
        assert r["rewards/margins"] == pytest.approx(
            r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5
        )
        assert r["memory/peak_gb"] >= r["memory/active_gb"]
    # 27 steps (6 epochs of 18 pairs, batch 4); step k's rate is the schedule's at k - 1: the warmup
    # step at peak / 2, then the cosine from the peak 2e-3 to 0.1 x peak at step 28
    from mipo_mlx.core.config import TrainingConfig
    from mipo_mlx.engine.trainer import schedule

    rate = schedule(TrainingConfig(learning_rate=2e-3), 27)
    assert len(rows) == 27 and rows[0]["learning_rate"] == pytest.approx(1e-3, rel=1e-5)
    assert [r["learning_rate"] for r in rows] == pytest.approx(
        [rate(mx.array(k)).item() for k in range(27)], rel=1e-5
    )
    assert rows[-1]["learning_rate"] == pytest.approx(
        2e-4 + 0.5 * 1.8e-3 * (1 + math.cos(math.pi * 25 / 26))
    )


def test_validation_metrics_are_the_final_adapters_on_the_valid_pairs(run_dir, toy_model_dir):
    """The last line's valid/ metrics equal the loss of the saved adapters on the valid pairs."""
    from mlx_lm import load

    from mipo_mlx.core.config import TrainingConfig
    from mipo_mlx.engine.trainer import make_loss

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tuned, _ = load(str(toy_model_dir), adapter_path=str(run_dir))
    valid = [p for p in read_pairs(run_dir / "pairs.jsonl") if p.split == "valid"]
    loss, metrics = make_loss(TrainingConfig())(tuned, pack_pairs(valid, 0).tree())
    assert rows[-1]["valid/loss"] == pytest.approx(loss.item(), abs=1e-4)
    assert rows[-1]["valid/rewards/margins"] == pytest.approx(
        metrics["rewards/margins"].item(), abs=1e-4
    )


def test_adapters_load_in_mlx_lm_and_change_logps(run_dir, toy_model_dir, toy_model):
    from mlx_lm import load

    tuned, _ = load(str(toy_model_dir), adapter_path=str(run_dir))
    base, _ = toy_model
    batch = pack_pairs(read_pairs(run_dir / "pairs.jsonl")[:4], 0).tree()
    tuned_c, tuned_r = pair_logps(tuned, batch)
    base_c, base_r = pair_logps(base, batch)
    margin_gain = ((tuned_c - base_c) - (tuned_r - base_r)).mean().item()
    assert mx.abs(tuned_c - base_c).max().item() > 1e-2
    assert margin_gain > 0  # the trained model prefers its own answers to the prompt


def test_mlx_lm_generate_cli_takes_the_adapters(run_dir, toy_model_dir):
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "generate",
        "--model",
        str(toy_model_dir),
        "--adapter-path",
        str(run_dir),
        "--prompt",
        "Tom has 3 apples.",
        "--max-tokens",
        "5",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
