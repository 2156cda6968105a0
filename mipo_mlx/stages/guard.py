"""The guard: the base and every round are scored on valid prompts, and a run ends with the
best of them, the base included, so that it never hands back a model that valid says is worse.

An intrinsic reward keeps rising after the task has peaked (context PMI rose every round
while compliance and well-formedness fell), so the objective alone cannot rank rounds. The
score is the task's own measure where the valid rows carry labels (an answer, or stated
requirements: `metrics.task_scores`), else the label-free objective PMI - KL to the base
(`evaluation.scored_metrics`), which charges a round for drifting off the base's distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from ..core.config import EvaluationConfig, GuardConfig
from ..core.errors import UserError
from ..core.files import write_json
from ..data.prompts import Prompt, read_source
from ..engine import distributed as dist
from ..engine.lora import (
    adapter_weights,
    base_adapter_weights,
    full_base,
    write_safetensors,
)
from .evaluation import Heldout
from .run_folder import RunFolder


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
    a copy): every rank keeps its own, and no rank reads another's disk. A full fine-tune's
    best weights are as large as the blocks themselves: they go to a file beside the base's
    (`lora.full_base`), so that the run still holds one copy of the model."""

    def __init__(self):
        self.best: dict[str, mx.array] | Path | None = None  # None: the base (B = 0)

    def offer(self, model, is_best: bool) -> None:
        if not is_best:
            return
        base = full_base(model)
        if base is None:
            self.best = dict(adapter_weights(model))
            return
        self.best = base.with_name("best.safetensors")
        write_safetensors(self.best, adapter_weights(model))

    def restore(self, model) -> None:
        """Put the kept adapters in the model: the base's own for the base (B = 0 adds
        nothing; a full fine-tune gets its base weights back)."""
        weights = self.best if self.best is not None else base_adapter_weights(model)
        if isinstance(weights, Path):
            weights = mx.load(str(weights))
        model.load_weights(list(weights.items()), strict=False)
        mx.eval(model.parameters())


class Guard:
    """The guard of a run: the base and each round scored on the valid prompts (kept in
    guard_base.json, guard_round-<k>.json, so a resumed run does not answer again), the best
    adapters held, and at the end put back. Without valid prompts it does nothing.
    `answer(adapters, lean)` is the evaluation stage on the valid prompts."""

    def __init__(
        self,
        config: GuardConfig,
        folder: RunFolder,
        model,
        valid: Heldout | None,
        answer: Callable[[bool, bool], dict],
    ):
        self.config, self.folder, self.model, self.answer = config, folder, model, answer
        self.valid, self.scores, self.keeper = valid, [], Keeper()
        if valid is not None:
            self.labels = uses_labels(config, valid)
            self.scores.append(self._score("guard_base.json", adapters=False))

    def _score(self, name: str, adapters: bool) -> float:
        result = self.folder.cached_json(name, lambda: self.answer(adapters, self.labels))
        return round_score(result, self.labels)

    def score_round(self, k: int) -> None:
        if self.valid is None:
            return
        self.scores.append(self._score(f"guard_round-{k}.json", adapters=True))
        self.keeper.offer(self.model, best_round(self.scores) == k)

    def finish(self) -> str | None:
        """Put the kept adapters back (guard.keep=best); the line that says what was kept."""
        if self.valid is None:
            return None
        last = len(self.scores) - 1
        kept = best_round(self.scores) if self.config.keep == "best" else last
        if kept != last:
            self.keeper.restore(self.model)
        dist.main_only(
            write_json,
            self.folder.path / "guard.json",
            {
                "score": "task" if self.labels else "label_free",
                "scores": {name(k): s for k, s in enumerate(self.scores)},
                "kept": name(kept),
                "keep": self.config.keep,
            },
        )
        return verdict(self.scores, kept, self.labels, self.config.keep)
