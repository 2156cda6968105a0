"""The training stage: LoRA adapters attached, the batch stream, the loop, and what the
run folder keeps of it (metrics, adapters, resumable checkpoints)."""

from __future__ import annotations

from ..core.backend import blas_line
from ..core.config import LoraConfig, TrainingConfig
from ..core.errors import UserError
from ..data.pair_file import Pair
from ..engine import distributed as dist
from ..engine.batching import batch_stream, pack_pairs, total_steps
from ..engine.lora import adapter_weights, attach_lora
from ..engine.memory import estimate, working_set_bytes
from ..engine.trainer import make_loss, train, validation_metrics
from .run_folder import RunFolder
from .trackers import Tracker


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


def train_adapters(
    model,
    pad: int,
    pairs: list[Pair],
    config: TrainingConfig,
    lora: LoraConfig,
    base_model: str,
    folder: RunFolder,
    should_stop=None,
    shared: bool = False,
    attach: bool = True,
    tracker: Tracker | None = None,
    steps_before: int = 0,
) -> dict[str, float]:
    """LoRA training on the pairs' 'train' split, validated on their 'valid' split; resumes from
    the folder's checkpoint. `shared` packs each prompt once for both responses. Without
    `attach`, the adapters the model holds (a previous round's) train on. Each metrics row also
    goes to `tracker`, at step `steps_before` + its step (earlier rounds' steps come first)."""
    tracker = tracker or Tracker()
    train_set = [p for p in pairs if p.split == "train"]
    valid_set = [p for p in pairs if p.split == "valid"]
    if attach:
        trainable = attach_lora(model, lora, config.seed)
    else:
        trainable = sum(v.size for v in adapter_weights(model).values())
    steps = total_steps(config, len(train_set), dist.size())
    dist.say(
        f"training {trainable:,} adapter parameters for {steps} steps on {len(train_set)} pairs "
        f"({len(valid_set)} held out)"
    )
    if any(p.reference_logps is None for p in pairs):
        raise ValueError("pairs without reference log-probs: score them first (score.py)")
    loss = make_loss(config)
    state = folder.load_checkpoint()
    if state is not None:
        check_position(state, steps, config.grad_accumulation, folder)
        dist.say(f"resuming training from the checkpoint at step {state.step}")
    # Lines after the checkpoint will be logged again. The tracker gets the lines before it
    # anew: a killed run may have lost some on their way (it keeps what it already holds)
    kept = folder.trim_metrics(state.step if state else 0)
    for row in kept:
        tracker.log(row, steps_before + row["step"])

    def validate():
        batches = (
            pack_pairs(valid_set[i : i + config.batch_size], pad, shared)
            for i in range(0, len(valid_set), config.batch_size)
        )
        return validation_metrics(model, loss, batches)

    def log(metrics):
        folder.append_metrics(metrics)
        tracker.log(metrics, steps_before + metrics["step"])
        progress.update(
            1,
            loss=metrics["loss"],
            margin=metrics["rewards/margins"],
            tok_s=f"{metrics['tokens_per_sec']:.0f}",
        )

    def save(step):
        folder.save_adapters(model, lora, base_model, step=None if step == steps else step)

    announce_memory(model, train_set, config)
    batches = batch_stream(
        train_set,
        config.batch_size * dist.size(),
        config.seed,
        pad,
        start=state.batches_done if state else 0,
        buckets=config.length_buckets,
        shared=shared,
        part=(dist.rank(), dist.size()),
    )
    with dist.progress(steps, "train") as progress:
        progress.update(state.step if state else 0)
        last = train(
            model,
            loss,
            batches,
            steps,
            config,
            validate=validate if valid_set else None,
            save=save,
            log=log,
            resume=state,
            checkpoint=folder.save_checkpoint,
            should_stop=(lambda: dist.any_rank(should_stop())) if should_stop else None,
        )
    if state is not None and state.step == steps:  # trained to the end before: outputs anew
        save(steps)
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
