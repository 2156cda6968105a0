"""NaN injection: a non-finite loss stops training keeping the last good checkpoint, or is
skipped."""

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mipo_mlx.core.config import LoraConfig, ModelConfig, TrainingConfig
from mipo_mlx.engine import model as mdl
from mipo_mlx.engine import train_state as ckpt
from mipo_mlx.engine.batching import pack_pairs
from mipo_mlx.engine.lora import adapter_weights, attach_lora
from mipo_mlx.engine.scoring import score_pairs
from mipo_mlx.engine.trainer import NonFiniteLoss, fit, make_loss

from .builders import hooks, made_up_pairs

POISONED_STEP = 3


def setup(model_dir):
    model, _, _ = mdl.load(ModelConfig(path=str(model_dir)))
    pairs = made_up_pairs(8, seed=5)
    for p, (c, r) in zip(pairs, score_pairs(model, pairs, 0, 4)):
        p.reference_logps = {"chosen": c, "rejected": r}
    attach_lora(model, LoraConfig(rank=4), seed=0)
    return model, pairs


def poisoned(pairs):
    """Batches of 4; the batch of step 3 has a NaN reference log-prob (as a corrupt pair file
    would)."""
    for k in itertools.count():
        batch = pack_pairs(pairs[(k % 2) * 4 : (k % 2) * 4 + 4], 0)
        if k + 1 == POISONED_STEP:
            batch.reference_chosen = mx.array([float("nan")] * 4)
        yield batch


def adapters_now(model):
    return {k: np.array(v) for k, v in adapter_weights(model).items()}


def test_nan_stops_and_keeps_the_last_good_checkpoint(toy_model_dir, tmp_path):
    model, pairs = setup(toy_model_dir)
    config = TrainingConfig(learning_rate=1e-3, checkpoint_every=1)
    with pytest.raises(NonFiniteLoss, match=f"step {POISONED_STEP}"):
        fit(
            model,
            make_loss(config),
            poisoned(pairs),
            6,
            config,
            hooks(on_checkpoint=lambda s: ckpt.save(tmp_path, s)),
        )
    state = ckpt.load(tmp_path)
    assert state.step == POISONED_STEP - 1
    assert all(np.isfinite(np.array(v)).all() for v in state.adapters.values())
    assert all(np.isfinite(np.array(v)).all() for _, v in tree_flatten(state.optimizer))


def test_nan_step_is_skipped_and_undone(toy_model_dir):
    model, pairs = setup(toy_model_dir)
    config = TrainingConfig(learning_rate=1e-3, on_nan="skip")
    logs, snapshots = [], {}

    def log(metrics):
        logs.append(metrics)
        snapshots[metrics["step"]] = adapters_now(model)

    fit(model, make_loss(config), poisoned(pairs), 5, config, hooks(on_step=log))
    assert (
        math.isnan(logs[POISONED_STEP - 1]["loss"])
        and logs[POISONED_STEP - 1]["skipped_non_finite"] == 1.0
    )
    for k, v in snapshots[POISONED_STEP - 1].items():  # the poisoned update was undone
        np.testing.assert_array_equal(snapshots[POISONED_STEP][k], v)
    assert all(np.isfinite(v).all() for v in adapters_now(model).values())
    assert logs[-1]["step"] == 5 and math.isfinite(logs[-1]["loss"])


def test_too_many_skips_stop(toy_model_dir):
    model, pairs = setup(toy_model_dir)
    config = TrainingConfig(on_nan="skip", max_skipped_steps=0)
    with pytest.raises(NonFiniteLoss):
        fit(model, make_loss(config), poisoned(pairs), 5, config)


def test_cli_reports_nan_in_one_line(toy_model_dir, tmp_path, monkeypatch, capsys):
    from mipo_mlx import train as train_cli
    from mipo_mlx.stages import training

    from .builders import write_prompts

    real = training.batch_stream

    def poison(*args, **kwargs):
        for k, batch in enumerate(real(*args, **kwargs)):
            if k == 1:
                batch.reference_chosen = batch.reference_chosen * float("nan")
            yield batch

    monkeypatch.setattr(training, "batch_stream", poison)
    prompts = write_prompts(tmp_path / "p.jsonl", n=8)
    code = train_cli.main(
        [
            "--model",
            str(toy_model_dir),
            "--prompts",
            str(prompts),
            "--output",
            str(tmp_path / "o"),
            "--generation.max_tokens",
            "6",
            "--generation.truncated",
            "keep",
            "--iters",
            "4",
            "--training.checkpoint_every",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: non-finite loss or gradient at step 2")
    assert "last good checkpoint" in err[-1]
    assert ckpt.load(tmp_path / "o").step == 1
