"""The training stage: LoRA adapters attached, the batch stream, the trainer, and what the
run folder keeps of it (metrics, adapters, resumable checkpoints)."""

from __future__ import annotations

from ..core.backend import blas_line
from ..core.config import TrainingConfig
from ..core.errors import UserError
from ..data.pair_file import Pair
from ..engine import distributed as dist
from ..engine.batching import batch_stream, pack_pairs, total_steps
from ..engine.lora import adapter_weights, attach_lora
from ..engine.memory import estimate, working_set_bytes
from ..engine.trainer import Hooks, fit, make_loss, validation_metrics
from .run import Run
from .run_folder import RunFolder


def announce_memory(model, pairs: list[Pair], config: TrainingConfig) -> None:
    need = estimate(model, pairs, config)
    limit = working_set_bytes()
    dist.say(
        f"estimated peak memory {need.total / 1e9:.2f} GB (model {need.model / 1e9:.2f}, "
        f"adapters + optimizer {need.adapters / 1e9:.3f}, "
        f"activations {need.activations / 1e9:.2f} for the longest batch)"
    )
    blas = blas_line()
    if blas:
        dist.say(blas)
    if limit and need.total > limit:
        dist.say(
            f"warning: that exceeds the recommended working set ({limit / 1e9:.1f} GB); lower "
            "training.batch_size, set training.grad_checkpoint=true or data.max_prompt_tokens"
        )


def check_scored(pairs: list[Pair]) -> None:
    """The training stage's input: pairs, every one with its reference log-probs (training
    against a missing reference would be reference-free DPO)."""
    if not pairs:
        raise ValueError("no pairs to train on: make them first (stages.pairs.make_pairs)")
    unscored = sum(p.reference_logps is None for p in pairs)
    if unscored:
        raise ValueError(
            f"{unscored} of {len(pairs)} pairs have no reference log-probs: score them first "
            "(stages.reference.score_reference)"
        )


class RunHooks(Hooks):
    """The trainer's hooks in a run: metrics to the run folder, the tracker and the progress
    bar; validation on the valid split; adapters and resumable state to the run folder."""

    def __init__(
        self, run: Run, valid_set: list[Pair], loss, shared: bool, steps: int, before: int
    ):
        self.run, self.valid_set, self.loss, self.shared = run, valid_set, loss, shared
        self.steps, self.before = steps, before
        self.progress = None  # set while the steps run

    def valid_metrics(self) -> dict[str, float]:
        if not self.valid_set:
            return {}
        size = self.run.config.training.batch_size
        batches = (
            pack_pairs(self.valid_set[i : i + size], self.run.pad, self.shared)
            for i in range(0, len(self.valid_set), size)
        )
        return validation_metrics(self.run.model, self.loss, batches)

    def on_step(self, metrics: dict[str, float]) -> None:
        self.run.folder.append_metrics(metrics)
        self.run.tracker.log(metrics, self.before + metrics["step"])
        self.progress.update(
            1,
            loss=metrics["loss"],
            margin=metrics["rewards/margins"],
            tok_s=f"{metrics['tokens_per_sec']:.0f}",
        )

    def on_save(self, step: int) -> None:
        c = self.run.config
        self.run.folder.save_adapters(
            self.run.model, c.lora, c.model.path, step=None if step == self.steps else step
        )

    def should_stop(self) -> bool:
        return self.run.should_stop()

    def on_checkpoint(self, state) -> None:
        self.run.folder.save_checkpoint(state)


def train(
    run: Run, pairs: list[Pair], shared: bool = False, attach: bool = True, steps_before: int = 0
) -> dict[str, float]:
    """LoRA training on the pairs' 'train' split, validated on their 'valid' split; resumes from
    the run folder's checkpoint. `shared` packs each prompt once for both responses. Without
    `attach`, the adapters the model holds (a previous round's) train on. Each metrics row also
    goes to the run's tracker, at step `steps_before` + its step (earlier rounds' steps come
    first). Returns the last step's metrics."""
    check_scored(pairs)
    config, model = run.config.training, run.model
    train_set = [p for p in pairs if p.split == "train"]
    valid_set = [p for p in pairs if p.split == "valid"]
    if attach:
        trainable = attach_lora(model, run.config.lora, config.seed)
    else:
        trainable = sum(v.size for v in adapter_weights(model).values())
    steps = total_steps(config, len(train_set), dist.size())
    dist.say(
        f"training {trainable:,} adapter parameters for {steps} steps on {len(train_set)} pairs "
        f"({len(valid_set)} held out)"
    )
    loss = make_loss(config)
    state = run.folder.load_checkpoint()
    if state is not None:
        check_position(state, steps, config.grad_accumulation, run.folder)
        dist.say(f"resuming training from the checkpoint at step {state.step}")
    # Lines after the checkpoint will be logged again. The tracker gets the lines before it
    # anew: a killed run may have lost some on their way (it keeps what it already holds)
    kept = run.folder.trim_metrics(state.step if state else 0)
    for row in kept:
        run.tracker.log(row, steps_before + row["step"])
    hooks = RunHooks(run, valid_set, loss, shared, steps, steps_before)
    announce_memory(model, train_set, config)
    batches = batch_stream(
        train_set,
        config.batch_size * dist.size(),
        config.seed,
        run.pad,
        start=state.batches_done if state else 0,
        buckets=config.length_buckets,
        shared=shared,
        part=(dist.rank(), dist.size()),
    )
    with dist.progress(steps, "train") as hooks.progress:
        hooks.progress.update(state.step if state else 0)
        last = fit(model, loss, batches, steps, config, hooks, resume=state)
    if state is not None and state.step == steps:  # trained to the end before: outputs anew
        hooks.on_save(steps)
        last = kept[-1] if kept and kept[-1].get("step") == steps else last
    return last


def check_position(state, steps: int, grad_accumulation: int, folder: RunFolder) -> None:
    """A checkpoint's step lies within the run's steps, and its data position follows from it
    (each step consumes grad_accumulation batches)."""
    where = folder.path / "checkpoint" / "state.json"
    if state.step > steps:
        raise UserError(
            f"{where}: step {state.step} is past this run's {steps} steps; delete the checkpoint "
            "folder to train again from the start"
        )
    if state.batches_done != state.step * grad_accumulation:
        raise UserError(
            f"{where}: {state.batches_done} batches done do not make {state.step} steps of "
            f"{grad_accumulation}; delete the checkpoint folder to train again from the start"
        )
