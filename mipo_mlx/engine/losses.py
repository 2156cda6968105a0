"""The DPO family of preference losses: pure functions of log-prob arrays.

Every loss takes a batch's `Logps` (the summed response log-probs of the policy and the
reference, each of shape (B,)) and its `LossSettings`, and returns the per-pair losses, (B,).
`preference_loss` adds the rewards, the implicit DPO rewards beta * (log pi - log ref), the
same for every loss. Losses are chosen by name from `LOSSES`; there is no if/elif ladder.
`core.loss_settings.HONOURS` says which settings each honours, and the configuration refuses
the others.

Notation: h = (pi_c - ref_c) - (pi_r - ref_r), the difference of log-ratios.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..core.loss_settings import HONOURS, LossSettings


@dataclass(frozen=True)
class Logps:
    """The summed response log-probs of B pairs, each (B,)."""

    policy_chosen: mx.array
    policy_rejected: mx.array
    reference_chosen: mx.array
    reference_rejected: mx.array

    @property
    def chosen(self) -> mx.array:
        """The chosen answers' log-ratios, log pi(y+|x) - log ref(y+|x)."""
        return self.policy_chosen - self.reference_chosen

    @property
    def rejected(self) -> mx.array:
        """The rejected answers' log-ratios."""
        return self.policy_rejected - self.reference_rejected


LossFn = Callable[[Logps, LossSettings], mx.array]
LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    if name not in HONOURS:
        raise KeyError(f"loss {name!r}: say which settings it honours in loss_settings.HONOURS")

    def add(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return add


def preference_loss(
    name: str, logps: Logps, settings: LossSettings
) -> tuple[mx.array, mx.array, mx.array]:
    """(losses, chosen_rewards, rejected_rewards) of the loss `name`, each (B,)."""
    beta = settings.beta
    return LOSSES[name](logps, settings), beta * logps.chosen, beta * logps.rejected


def _h(p: Logps) -> mx.array:
    return p.chosen - p.rejected


@register("sigmoid")
def sigmoid_loss(p: Logps, s: LossSettings) -> mx.array:
    """DPO (Rafailov et al. 2023, eq. 7), conservative with label smoothing eps:
    L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    logits, eps = s.beta * _h(p), s.label_smoothing
    return -(1 - eps) * nn.log_sigmoid(logits) - eps * nn.log_sigmoid(-logits)


@register("robust")
def robust_loss(p: Logps, s: LossSettings) -> mx.array:
    """Robust DPO (Chowdhury et al. 2024, eq. 8), unbiased under label-flip rate eps:
    L = [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)."""
    logits, eps = s.beta * _h(p), s.label_smoothing
    return (-(1 - eps) * nn.log_sigmoid(logits) + eps * nn.log_sigmoid(-logits)) / (1 - 2 * eps)


@register("hinge")
def hinge_loss(p: Logps, s: LossSettings) -> mx.array:
    """SLiC-style hinge (Zhao et al. 2023): L = max(0, 1 - beta h)."""
    return mx.maximum(0.0, 1.0 - s.beta * _h(p))


@register("ipo")
def ipo_loss(p: Logps, s: LossSettings) -> mx.array:
    """IPO (Azar et al. 2023, eq. 17) on summed log-probs: L = (h - 1/(2 beta))^2.
    (TRL averages IPO's log-probs over tokens; we keep the paper's sums.)"""
    return (_h(p) - 1.0 / (2.0 * s.beta)) ** 2


@register("sppo_hard")
def sppo_hard_loss(p: Logps, s: LossSettings) -> mx.array:
    """SPPO with hard labels (Wu et al. 2024, eq. 4.5 as in TRL):
    L = (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2, a and b the chosen and rejected log-ratios."""
    return (p.chosen - 0.5 / s.beta) ** 2 + (p.rejected + 0.5 / s.beta) ** 2


@register("nca_pair")
def nca_pair_loss(p: Logps, s: LossSettings) -> mx.array:
    """NCA (Chen et al. 2024, eq. 11 as in TRL), with r = beta * log-ratio:
    L = -log sigmoid(r_c) - 1/2 log sigmoid(-r_c) - 1/2 log sigmoid(-r_r)."""
    rc, rr = s.beta * p.chosen, s.beta * p.rejected
    return -nn.log_sigmoid(rc) - 0.5 * nn.log_sigmoid(-rc) - 0.5 * nn.log_sigmoid(-rr)


@register("sft")
def sft_loss(p: Logps, s: LossSettings) -> mx.array:
    """The paper's SFT baseline: maximise the likelihood of the model's own answers,
    L = -log pi(y+ | x) (summed over answer tokens); the rejected side is ignored.
    Rewards are still reported as beta * log-ratios, to compare with DPO runs."""
    return -p.policy_chosen


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
