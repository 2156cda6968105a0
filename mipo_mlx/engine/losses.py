"""The DPO family of preference losses: pure functions of log-prob arrays.

Every loss takes the summed response log-probs of the policy and the reference,
each of shape (B,), and returns (losses, chosen_rewards, rejected_rewards), each
(B,). Rewards are the implicit DPO rewards beta * (log pi - log ref). Losses are
chosen by name from `LOSSES`; there is no if/elif ladder. Each takes every setting of
`loss_settings.LOSS_SETTINGS`; `loss_settings.HONOURS` says which of them it honours, and the
configuration refuses the others.

Notation: h = (pi_c - ref_c) - (pi_r - ref_r), the difference of log-ratios.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from ..core.loss_settings import HONOURS

LossFn = Callable[..., tuple[mx.array, mx.array, mx.array]]
LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    if name not in HONOURS:
        raise KeyError(f"loss {name!r}: say which settings it honours in loss_settings.HONOURS")

    def add(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return add


def _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    chosen = policy_chosen - reference_chosen  # (B,)
    rejected = policy_rejected - reference_rejected  # (B,)
    return chosen, rejected


@register("sigmoid")
def sigmoid_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """DPO (Rafailov et al. 2023, eq. 7), conservative with label smoothing eps:
    L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    chosen, rejected = _log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    logits = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * nn.log_sigmoid(logits) - label_smoothing * nn.log_sigmoid(
        -logits
    )
    return losses, beta * chosen, beta * rejected


@register("robust")
def robust_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """Robust DPO (Chowdhury et al. 2024, eq. 8), unbiased under label-flip rate eps:
    L = [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)."""
    chosen, rejected = _log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    logits = beta * (chosen - rejected)
    losses = (
        -(1 - label_smoothing) * nn.log_sigmoid(logits) + label_smoothing * nn.log_sigmoid(-logits)
    ) / (1 - 2 * label_smoothing)
    return losses, beta * chosen, beta * rejected


@register("hinge")
def hinge_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """SLiC-style hinge (Zhao et al. 2023): L = max(0, 1 - beta h)."""
    chosen, rejected = _log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    losses = mx.maximum(0.0, 1.0 - beta * (chosen - rejected))
    return losses, beta * chosen, beta * rejected


@register("ipo")
def ipo_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """IPO (Azar et al. 2023, eq. 17) on summed log-probs: L = (h - 1/(2 beta))^2.
    (TRL averages IPO's log-probs over tokens; we keep the paper's sums.)"""
    chosen, rejected = _log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen, beta * rejected


@register("sppo_hard")
def sppo_hard_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """SPPO with hard labels (Wu et al. 2024, eq. 4.5 as in TRL):
    L = (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2, a and b the chosen and rejected log-ratios."""
    chosen, rejected = _log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return losses, beta * chosen, beta * rejected


@register("nca_pair")
def nca_pair_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """NCA (Chen et al. 2024, eq. 11 as in TRL), with r = beta * log-ratio:
    L = -log sigmoid(r_c) - 1/2 log sigmoid(-r_c) - 1/2 log sigmoid(-r_r)."""
    chosen, rejected = _log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    rc, rr = beta * chosen, beta * rejected
    losses = -nn.log_sigmoid(rc) - 0.5 * nn.log_sigmoid(-rc) - 0.5 * nn.log_sigmoid(-rr)
    return losses, rc, rr


@register("sft")
def sft_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """The paper's SFT baseline: maximise the likelihood of the model's own answers,
    L = -log pi(y+ | x) (summed over answer tokens); the rejected side is ignored.
    Rewards are still reported as beta * log-ratios, to compare with DPO runs."""
    chosen, rejected = _log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    return -policy_chosen, beta * chosen, beta * rejected


def with_chosen_nll(losses, policy_chosen, chosen_lengths, weight: float):
    """Iterative RPO (Pang et al. 2024, eq. 3): the preference loss plus a length-normalised
    NLL of the chosen answer, L = L_pref + alpha * (-log pi(y+|x)) / |y+|. Plain DPO lowers
    the likelihood of both answers; the NLL term keeps the chosen ones likely, so iterated
    rounds do not drift off the model's own distribution. losses, policy_chosen and
    chosen_lengths (tokens scored in y+, stop token included) are (B,); returns (B,)."""
    return losses - weight * policy_chosen / chosen_lengths


def preference_metrics(
    losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected
) -> dict:
    """Per-batch metrics with TRL's names; accuracy is the per-pair fraction."""
    return {
        "loss": losses.mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.mean(),
        "logps/rejected": policy_rejected.mean(),
    }
