"""The trainer: `fit` runs optimizer steps, given the loss, the batches and a `Hooks` object.

The optimizer training.optimizer names (AdamW by default; adam, muon, sgd or adafactor) with
linear warmup and cosine decay, global gradient-norm clipping, gradient accumulation, an
`mx.compile`d step and one `mx.eval` per step. What the steps report and keep (metrics,
validation, saved adapters, resumable state, a stop) goes through the hooks: the trainer knows
nothing of run folders or trackers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..core.config import TrainingConfig
from ..core.errors import Stopped
from ..core.loss_settings import LossSettings
from ..core.settings import optimizer_kwargs
from . import distributed as dist
from .batching import Batch
from .logps import pair_logps
from .losses import Logps, preference_loss, preference_metrics, with_chosen_nll
from .prefix import RECOMPUTED
from .train_state import TrainState, capture, restore

StepLoss = Callable[[nn.Module, dict[str, mx.array]], tuple[mx.array, dict[str, mx.array]]]


def make_loss(config: TrainingConfig) -> StepLoss:
    """loss(model, batch.tree()) -> (mean loss, metrics); with training.nll_weight, the
    preference loss plus the chosen answers' length-normalised NLL ('nll/chosen' reports it)."""
    settings = LossSettings.of(config)

    def loss(model, batch: dict[str, mx.array]):
        chosen, rejected = pair_logps(model, batch)
        logps = Logps(chosen, rejected, batch["reference_chosen"], batch["reference_rejected"])
        losses, chosen_rewards, rejected_rewards = preference_loss(config.loss, logps, settings)
        nll = {}
        if config.nll_weight > 0:
            lengths = batch["owners"].sum(axis=0)[: chosen.shape[0]]  # (B,) tokens of each y+
            losses = with_chosen_nll(losses, chosen, lengths, config.nll_weight)
            nll = {"nll/chosen": (-chosen / lengths).mean()}
        metrics = preference_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)
        return metrics["loss"], {**metrics, **nll}

    return loss


def schedule(config: TrainingConfig, steps: int) -> Callable[[mx.array], mx.array]:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio x peak."""
    peak = config.learning_rate
    warmup = math.ceil(config.warmup_fraction * steps) if config.warmup_fraction > 0 else 0
    decay = optim.cosine_decay(peak, max(steps - warmup, 1), end=peak * config.min_lr_ratio)
    if warmup == 0:
        return decay
    # Start at peak/(warmup+1), not 0, so the first step is not wasted.
    ramp = optim.linear_schedule(peak / (warmup + 1), peak, warmup)
    return optim.join_schedules([ramp, decay], [warmup])


# The class of each training.optimizer (config.OPTIMIZERS lists their keywords), as mlx-lm's tuner
OPTIMIZER_CLASSES: dict[str, type[optim.Optimizer]] = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "muon": optim.Muon,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}


def make_optimizer(config: TrainingConfig, steps: int) -> optim.Optimizer:
    """training.optimizer, its learning rate the schedule, its other keywords those of
    `settings.optimizer_kwargs` (training.optimizer_config, then adam_beta1/2 and weight_decay)."""
    return OPTIMIZER_CLASSES[config.optimizer](
        learning_rate=schedule(config, steps), **optimizer_kwargs(config)
    )


def recompute_blocks(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass (training.grad_checkpoint):
    activations are not kept between the forward and the backward.

    Only these block instances change class (to a subclass made here): unlike
    patching the block class itself, other models in the process are untouched.
    """
    for layer in model.layers:
        base = type(layer)
        if getattr(base, RECOMPUTED, False):
            continue

        def call(self, *args, _fn=base.__call__, **kwargs):
            def inner(params, *a, **k):
                self.update(params)
                return _fn(self, *a, **k)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        layer.__class__ = type(base.__name__, (base,), {"__call__": call, RECOMPUTED: True})


def memory_metrics() -> dict[str, float]:
    """Active, cache and peak memory in GB (peak alone omits the buffer cache)."""
    return {
        "memory/active_gb": mx.get_active_memory() / 1e9,
        "memory/cache_gb": mx.get_cache_memory() / 1e9,
        "memory/peak_gb": mx.get_peak_memory() / 1e9,
    }


def make_step(model: nn.Module, optimizer: optim.Optimizer, loss: StepLoss, config: TrainingConfig):
    """step(batch tree, grad_sum, update) -> (metrics, grad_sum); compiled unless
    config.compile is off."""
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    def step(batch: dict[str, mx.array], grad_sum, update: bool):
        (_, metrics), grads = loss_and_grad(model, batch)
        # Each rank holds an equal slice of the global batch
        metrics = dist.mean_over_ranks(metrics)
        if grad_sum is not None:
            grads = tree_map(lambda a, b: a + b, grads, grad_sum)
        if not update:
            return metrics, grads
        grads = dist.average_gradients(grads)
        if config.grad_accumulation > 1:
            grads = tree_map(lambda g: g / config.grad_accumulation, grads)
        if config.grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, config.grad_clip)
        else:
            norm = optim.clip_grad_norm(grads, float("inf"))[1]
        optimizer.update(model, grads)
        return {**metrics, "grad_norm": norm}, None

    if config.compile:
        return partial(mx.compile, inputs=state, outputs=state)(step)
    return step


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def validation_metrics(
    model: nn.Module, loss: StepLoss, batches: Iterable[Batch]
) -> dict[str, float]:
    """Mean metrics over held-out batches, with dropout off; prefixed 'valid/'."""
    model.eval()
    rows, weights = [], []
    for batch in batches:
        _, metrics = loss(model, batch.tree())
        mx.eval(metrics)
        rows.append({k: v.item() for k, v in metrics.items()})
        weights.append(batch.n_pairs)
    model.train()
    if not rows:
        return {}
    total = sum(weights)
    return {f"valid/{k}": sum(r[k] * w for r, w in zip(rows, weights)) / total for k in rows[0]}


class Hooks:
    """What `fit` calls out to, each a no-op here: subclass and override what you need (as
    mlx-lm's `TrainingCallback`). `fit` calls, after each optimizer step and in this order:
    `valid_metrics` (on the last step and every training.valid_every steps), `on_step` with
    the step's metrics, `on_save` (the last step and every training.save_every steps),
    `should_stop`, and `on_checkpoint` with the resumable state (the last step, every
    training.checkpoint_every steps, and a step after which it stops)."""

    def valid_metrics(self) -> dict[str, float]:
        """Metrics on held-out batches, merged into the step's ('valid/...')."""
        return {}

    def on_step(self, metrics: dict[str, float]) -> None:
        """The metrics of one optimizer step: loss, rewards, grad_norm, speed, memory."""

    def on_save(self, step: int) -> None:
        """Keep the adapters as they are after `step`."""

    def should_stop(self) -> bool:
        """Whether to stop after this step (its state is checkpointed first)."""
        return False

    def on_checkpoint(self, state: TrainState) -> None:
        """Keep the resumable state (adapters, optimizer, step, data position)."""


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        super().__init__(f"non-finite loss or gradient at step {step}")
        self.step = step


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def fit(
    model: nn.Module,
    loss: StepLoss,
    batches: Iterator[Batch],
    steps: int,
    config: TrainingConfig,
    hooks: Hooks | None = None,
    *,
    optimizer: optim.Optimizer | None = None,
    resume: TrainState | None = None,
) -> dict[str, float]:
    """Run optimizer steps up to `steps` (from `resume.step` when given); each takes
    `grad_accumulation` batches, and `hooks` hear of each. Returns the last metrics."""
    hooks = hooks or Hooks()
    optimizer = optimizer or make_optimizer(config, steps)
    if resume is not None:
        restore(model, optimizer, resume)
    if config.grad_checkpoint:
        recompute_blocks(model)
    model.train()
    step_fn = make_step(model, optimizer, loss, config)
    state = [model.state, optimizer.state]
    last: dict[str, float] = {}
    start = resume.step if resume is not None else 0
    batches_done = resume.batches_done if resume is not None else 0
    skipped = 0
    for step in range(start + 1, steps + 1):
        # Dropout draws depend on the step alone: resumable
        mx.random.seed(config.seed * 1_000_003 + step)
        # Keep the state to undo a non-finite step (arrays are immutable)
        if config.on_nan == "skip":
            before = (model.trainable_parameters(), tree_map(lambda x: x, optimizer.state))
        tic, grad_sum, rows, tokens = time.perf_counter(), None, [], 0
        for micro in range(config.grad_accumulation):
            batch = next(batches)
            metrics, grad_sum = step_fn(
                batch.tree(), grad_sum, micro == config.grad_accumulation - 1
            )
            rows.append(metrics)
            tokens += batch.n_tokens
        batches_done += config.grad_accumulation
        mx.eval(state, rows)  # one evaluation per optimizer step; a sync point
        seconds = time.perf_counter() - tic
        last = {
            "step": step,
            **_mean([{k: v.item() for k, v in r.items() if k != "grad_norm"} for r in rows]),
            "grad_norm": rows[-1]["grad_norm"].item(),
            "learning_rate": float(optimizer.learning_rate.item()),
            "tokens_per_sec": tokens / seconds,
            "step_seconds": seconds,
            **memory_metrics(),
        }
        if not _finite(last["loss"], last["grad_norm"]):
            if config.on_nan == "stop" or skipped >= config.max_skipped_steps:
                raise NonFiniteLoss(step)
            model.update(before[0])  # undo the update: the old arrays are intact
            optimizer.state.update(before[1])
            skipped += 1
            last["skipped_non_finite"] = 1.0
        if step == steps or (config.valid_every and step % config.valid_every == 0):
            last.update(hooks.valid_metrics())
        hooks.on_step(last)
        if step == steps or (config.save_every and step % config.save_every == 0):
            hooks.on_save(step)
        stop = hooks.should_stop()
        if stop or step == steps or step % config.checkpoint_every == 0:
            hooks.on_checkpoint(capture(model, optimizer, step, batches_done))
        if stop and step < steps:
            raise Stopped(step)
    return last
