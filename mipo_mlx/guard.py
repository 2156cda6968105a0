"""The guard: the base and every round are scored on valid prompts, and a run ends with the
best of them, the base included, so that it never hands back a model that valid says is worse.

An intrinsic reward keeps rising after the task has peaked (context PMI rose every round
while compliance and well-formedness fell), so the objective alone cannot rank rounds. The
score is the task's own measure where the valid rows carry labels (an answer, or stated
requirements: `measure.task_scores`), else the label-free objective PMI - KL to the base
(`measure.scored_metrics`), which charges a round for drifting off the base's distribution.
"""

from __future__ import annotations

import mlx.core as mx

from . import model as mdl
from .config import EvaluationConfig, GuardConfig
from .errors import UserError
from .measure import Heldout
from .prompts import Prompt, read_source


def guard_prompts(config: GuardConfig, evaluation: EvaluationConfig) -> list[Prompt]:
    """The valid prompts (read before any model loads: bad input stops early)."""
    return read_source(config.prompts, evaluation.format, None, 0, None, 0, config.limit)


def uses_labels(config: GuardConfig, valid: Heldout) -> bool:
    """Whether the rounds are ranked by the task's own measure (else the label-free one)."""
    labelled = any(label is not None for label in valid.labels) or any(
        "requirements" in p.extra for p in valid.rendered.prompts
    )
    if config.score == "labels" and not labelled:
        raise UserError(
            f"{config.prompts}: guard.score=labels, but no row has an 'answer' or requirements; "
            "add them or set guard.score=label_free"
        )
    return config.score == "labels" or (config.score == "auto" and labelled)


def round_score(result: dict, labels: bool) -> float:
    return result["task_score"] if labels else result["objective"]


def best_round(scores: list[float]) -> int:
    """The index of the best score, 0 being the base; on a tie the earlier one: a later round
    must beat it."""
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


def name(k: int) -> str:
    return "the base" if k == 0 else f"round {k}"


def verdict(scores: list[float], kept: int, labels: bool, keep: str) -> str:
    """The one line a run ends with about what it kept."""
    measure = "task score" if labels else "label-free score (PMI - KL)"
    each = ", ".join(f"{name(k)} {s:.3f}" for k, s in enumerate(scores))
    if keep == "last":
        return f"guard off (guard.keep=last): kept round {len(scores) - 1}; valid {measure}: {each}"
    if kept == 0:
        return (
            f"no round beat the base on valid ({measure}: {each}): the adapters saved are zero, "
            "so the run's result is the base model itself"
        )
    return f"kept {name(kept)}, the best on valid ({measure}: {each})"


class Keeper:
    """The best adapters so far, held in memory (MLX arrays are immutable, so holding them is
    a copy): every rank keeps its own, and no rank reads another's disk."""

    def __init__(self):
        self.best: dict[str, mx.array] | None = None  # None: the base (zero adapters)

    def offer(self, model, is_best: bool) -> None:
        if is_best:
            self.best = dict(mdl.adapter_weights(model))

    def restore(self, model) -> None:
        """Put the kept adapters in the model: zero ones for the base (B = 0 adds nothing)."""
        weights = self.best or {k: mx.zeros_like(v) for k, v in mdl.adapter_weights(model).items()}
        model.load_weights(list(weights.items()), strict=False)
        mx.eval(model.parameters())
