"""Hand-derived values for every loss in the registry.

Shared case: policy chosen/rejected log-probs -1 and -3, reference -2 and -2,
beta 0.1. Log-ratios: chosen a = -1 - (-2) = 1, rejected b = -3 - (-2) = -1,
so h = a - b = 2 and beta*h = 0.2; rewards are beta*a = 0.1 and beta*b = -0.1.
  log(1 + e^-0.2) = 0.5981388693, log(1 + e^0.2) = 0.7981388693,
  log(1 + e^-0.1) = 0.6443966600, log(1 + e^0.1) = 0.7443966600.
"""

import math

import mlx.core as mx
import pytest

from mipo_mlx.core import config
from mipo_mlx.core.errors import UserError
from mipo_mlx.core.loss_settings import HONOURS, LossSettings
from mipo_mlx.core.settings import validate
from mipo_mlx.engine.losses import LOSSES, Logps, preference_loss, preference_metrics

PC, PR, RC, RR = mx.array([-1.0]), mx.array([-3.0]), mx.array([-2.0]), mx.array([-2.0])
SP_NEG_02, SP_POS_02 = 0.5981388693, 0.7981388693  # softplus(-0.2), softplus(0.2)
SP_NEG_01, SP_POS_01 = 0.6443966600, 0.7443966600


def value(name, beta=0.1, **kw):
    losses, rc, rr = preference_loss(name, Logps(PC, PR, RC, RR), LossSettings(beta, **kw))
    return losses.item(), rc.item(), rr.item()


@pytest.mark.parametrize(
    "name, expected",
    [
        # -log sigmoid(0.2) = log(1 + e^-0.2)
        ("sigmoid", SP_NEG_02),
        # robust with eps = 0: the same as sigmoid
        ("robust", SP_NEG_02),
        # max(0, 1 - 0.2)
        ("hinge", 0.8),
        # (h - 1/(2 beta))^2 = (2 - 5)^2
        ("ipo", 9.0),
        # (a - 5)^2 + (b + 5)^2 = 16 + 16
        ("sppo_hard", 32.0),
        # -log s(0.1) - 1/2 log s(-0.1) - 1/2 log s(0.1) = sp(-0.1) + sp(0.1)/2 + sp(-0.1)/2
        ("nca_pair", SP_NEG_01 + 0.5 * SP_POS_01 + 0.5 * SP_NEG_01),
    ],
)
def test_hand_derived_losses(name, expected):
    loss, chosen_reward, rejected_reward = value(name)
    assert loss == pytest.approx(expected, abs=1e-6)
    assert chosen_reward == pytest.approx(0.1, abs=1e-7)
    assert rejected_reward == pytest.approx(-0.1, abs=1e-7)


def test_sigmoid_label_smoothing():
    """eps = 0.1: 0.9 * sp(-0.2) + 0.1 * sp(0.2)."""
    assert value("sigmoid", label_smoothing=0.1)[0] == pytest.approx(
        0.9 * SP_NEG_02 + 0.1 * SP_POS_02, abs=1e-6
    )


def test_robust_label_smoothing():
    """eps = 0.1: (0.9 * sp(-0.2) - 0.1 * sp(0.2)) / 0.8."""
    expected = (0.9 * SP_NEG_02 - 0.1 * SP_POS_02) / 0.8
    assert value("robust", label_smoothing=0.1)[0] == pytest.approx(expected, abs=1e-6)


def test_policy_equal_to_reference_gives_log_2():
    logps = mx.array([-5.0, -7.5, -1.25])
    other = mx.array([-3.0, -9.0, -4.0])
    losses, rc, rr = preference_loss("sigmoid", Logps(logps, other, logps, other), LossSettings())
    assert mx.allclose(losses, mx.full((3,), math.log(2.0)), atol=1e-7).item()
    assert mx.all(rc == 0).item() and mx.all(rr == 0).item()


def test_accuracy_is_per_pair_not_per_batch():
    """Two of three pairs have chosen reward > rejected: accuracy 2/3
    (a batch-mean rule would say 1)."""
    rc, rr = mx.array([1.0, 1.0, -5.0]), mx.array([0.0, 0.0, 0.0])
    metrics = preference_metrics(mx.zeros(3), rc, rr, mx.zeros(3), mx.zeros(3))
    assert metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)
    assert metrics["rewards/margins"].item() == pytest.approx((1 + 1 - 5) / 3)


def test_registry_matches_config_choices():
    from mipo_mlx.core.config import LOSSES as CONFIG_LOSSES

    assert set(CONFIG_LOSSES) == set(LOSSES)


def test_gradient_sign_pushes_chosen_up():
    """d/d(pi_c) of sigmoid DPO = -beta * sigmoid(-beta h) < 0: descent raises pi_c."""
    grad = mx.grad(lambda pc: LOSSES["sigmoid"](Logps(pc, PR, RC, RR), LossSettings()).sum())(PC)
    expected = -0.1 * (1 / (1 + math.exp(0.2)))
    assert grad.item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("setting, other", [("beta", 0.3), ("label_smoothing", 0.2)])
def test_a_loss_honours_exactly_the_settings_its_registry_entry_names(name, setting, other):
    """Changing a setting changes a loss's values (loss or rewards) if and only if
    loss_settings.HONOURS says the loss honours it: the table the configuration checks is
    the functions' own behaviour."""
    assert set(LOSSES) == set(HONOURS) == set(config.LOSSES)
    changed = value(name, **{setting: other})
    assert (changed != value(name)) == (setting in HONOURS[name])


@pytest.mark.parametrize("name", ["hinge", "ipo", "sppo_hard", "nca_pair", "sft"])
def test_label_smoothing_on_a_loss_that_ignores_it_is_refused_before_any_stage(name):
    settings = config.Config()
    settings.model.path, settings.data.prompts = "m", "p.jsonl"
    settings.training.loss, settings.training.label_smoothing = name, 0.1
    with pytest.raises(
        UserError,
        match=f"training.label_smoothing=0.1 has no effect on "
        f"training.loss={name} \\(only sigmoid, robust use it\\)",
    ):
        validate(settings)
    settings.training.label_smoothing = 0.0
    validate(settings)
