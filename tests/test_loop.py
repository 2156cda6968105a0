"""The training loop: log 2 at step 0, only adapters change, accumulation and compile agree."""

import itertools
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mipo_mlx.core.config import LoraConfig, ModelConfig, TrainingConfig
from mipo_mlx.engine import model as mdl
from mipo_mlx.engine.batching import pack_pairs
from mipo_mlx.engine.lora import attach_lora
from mipo_mlx.engine.scoring import score_pairs
from mipo_mlx.engine.trainer import fit, make_loss, recompute_blocks, schedule

from .builders import hooks, made_up_pairs


def setup(model_dir, n=8, seed=0):
    model, _, _ = mdl.load(ModelConfig(path=str(model_dir)))
    pairs = made_up_pairs(n, seed=seed)
    for p, (c, r) in zip(pairs, score_pairs(model, pairs, 0, 4)):
        p.reference_logps = {"chosen": c, "rejected": r}
    attach_lora(model, LoraConfig(rank=4), seed=0)
    return model, pairs


def cycle(pairs, size):
    for i in itertools.count():
        start = (i * size) % len(pairs)
        yield pack_pairs(pairs[start : start + size], 0)


def params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_step_zero_loss_is_log2_and_margins_zero(toy_model_dir):
    """Adapters start at B = 0, so policy == reference: every pair has h = 0 and loss log 2."""
    model, pairs = setup(toy_model_dir)
    logs = []
    fit(
        model,
        make_loss(TrainingConfig()),
        cycle(pairs, 4),
        1,
        TrainingConfig(),
        hooks(on_step=logs.append),
    )
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_step_zero_loss_with_the_nll_term_is_log2_plus_the_weighted_chosen_nll(toy_model_dir):
    """At step 0 policy == reference, so each pair's loss is log 2 + alpha * NLL(y+|x) / |y+|,
    where NLL(y+|x) = -reference_chosen (scored apart by score_pairs) and |y+| is the number of
    chosen tokens. The batch's loss is the mean over its 4 pairs."""
    model, pairs = setup(toy_model_dir)
    alpha = 0.7
    config = TrainingConfig(nll_weight=alpha)
    logs = []
    fit(model, make_loss(config), cycle(pairs, 4), 1, config, hooks(on_step=logs.append))
    nll = [-p.reference_logps["chosen"] / len(p.chosen_ids) for p in pairs[:4]]
    assert logs[0]["loss"] == pytest.approx(math.log(2) + alpha * np.mean(nll), abs=1e-5)
    assert logs[0]["nll/chosen"] == pytest.approx(np.mean(nll), abs=1e-5)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_the_nll_term_by_hand():
    """Two pairs, their DPO losses log 2, chosen log-probs -2 and -6 over 2 and 3 tokens, weight
    0.5: 0.5 * 2/2 = 0.5 and 0.5 * 6/3 = 1.0 are added."""
    from mipo_mlx.engine.losses import with_chosen_nll

    got = with_chosen_nll(
        mx.array([math.log(2)] * 2), mx.array([-2.0, -6.0]), mx.array([2.0, 3.0]), 0.5
    )
    assert got.tolist() == pytest.approx([math.log(2) + 0.5, math.log(2) + 1.0])


def test_only_adapters_change_and_their_gradients_are_nonzero(toy_model_dir):
    model, pairs = setup(toy_model_dir)
    before = params(model)
    loss = make_loss(TrainingConfig())
    _, grads = nn.value_and_grad(model, loss)(model, pack_pairs(pairs[:4], 0).tree())
    grads = dict(tree_flatten(grads))
    assert set(grads) == {k for k in before if k.endswith(("lora_a", "lora_b"))}
    # At B = 0, d loss / d A = x^T (dy B^T) = 0 exactly, while d loss / d B is not zero.
    assert all(np.abs(np.array(g)).sum() > 0 for k, g in grads.items() if k.endswith("lora_b"))
    assert all(np.abs(np.array(g)).sum() == 0 for k, g in grads.items() if k.endswith("lora_a"))
    fit(model, loss, cycle(pairs, 4), 2, TrainingConfig(learning_rate=1e-3))
    after = params(model)
    for k in before:
        changed = not np.array_equal(before[k], after[k])
        assert changed == k.endswith(("lora_a", "lora_b")), k


def test_margin_rises_on_training_pairs(toy_model_dir):
    model, pairs = setup(toy_model_dir)
    logs = []
    config = TrainingConfig(learning_rate=2e-3, warmup_fraction=0)
    fit(model, make_loss(config), cycle(pairs, 4), 30, config, hooks(on_step=logs.append))
    assert np.mean([m["rewards/margins"] for m in logs[-4:]]) > 0.5
    assert np.mean([m["loss"] for m in logs[-4:]]) < math.log(2) - 0.1


def run_steps(model_dir, config, batch):
    model, pairs = setup(model_dir)
    fit(model, make_loss(config), cycle(pairs, batch), 3, config)
    return params(model)


def test_accumulation_equals_large_batch(toy_model_dir):
    big = run_steps(toy_model_dir, TrainingConfig(learning_rate=1e-3), 4)
    small = run_steps(toy_model_dir, TrainingConfig(learning_rate=1e-3, grad_accumulation=2), 2)
    for k in big:
        np.testing.assert_allclose(big[k], small[k], atol=1e-5, err_msg=k)


def test_compiled_equals_eager(toy_model_dir):
    compiled = run_steps(toy_model_dir, TrainingConfig(learning_rate=1e-3), 4)
    eager = run_steps(toy_model_dir, TrainingConfig(learning_rate=1e-3, compile=False), 4)
    for k in compiled:
        np.testing.assert_allclose(compiled[k], eager[k], atol=1e-5, err_msg=k)


def test_gradient_checkpointing_same_result_and_local(toy_model_dir):
    plain = run_steps(toy_model_dir, TrainingConfig(learning_rate=1e-3), 4)
    checked = run_steps(toy_model_dir, TrainingConfig(learning_rate=1e-3, grad_checkpoint=True), 4)
    for k in plain:
        np.testing.assert_allclose(plain[k], checked[k], atol=1e-5, err_msg=k)
    other, _, _ = mdl.load(ModelConfig(path=str(toy_model_dir)))
    assert not getattr(type(other.layers[0]), "_mipo_recomputed", False)  # no process-wide patch
    recompute_blocks(other)
    assert getattr(type(other.layers[0]), "_mipo_recomputed", False)


def test_gradient_clipping_bounds_the_update(toy_model_dir):
    """With plain SGD at lr 1 the update is the clipped gradient itself: its global norm
    must equal the clip value when the raw norm (reported as grad_norm) is larger."""
    model, pairs = setup(toy_model_dir)
    before, logs = params(model), []
    config = TrainingConfig(grad_clip=0.01)
    fit(
        model,
        make_loss(config),
        cycle(pairs, 4),
        1,
        config,
        hooks(on_step=logs.append),
        optimizer=optim.SGD(learning_rate=1.0),
    )
    after = params(model)
    update_norm = math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in before))
    assert logs[0]["grad_norm"] > 0.1
    assert update_norm == pytest.approx(0.01, rel=1e-3)


def test_schedule_warmup_then_cosine():
    config = TrainingConfig(learning_rate=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
    lr = schedule(config, 100)  # 10 warmup steps
    assert lr(mx.array(0)).item() == pytest.approx(1e-3 / 11, rel=1e-5)
    assert lr(mx.array(10)).item() == pytest.approx(1e-3, rel=1e-5)
    assert lr(mx.array(100)).item() == pytest.approx(1e-4, rel=1e-4)
    assert lr(mx.array(55)).item() == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-3)
