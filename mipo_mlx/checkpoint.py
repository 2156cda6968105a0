"""Training checkpoints: adapters, optimizer state, step, random state; written atomically.

A checkpoint is a folder `checkpoint/` in the run's output:
  adapters.safetensors   the LoRA weights
  state.safetensors      the optimizer's state (Adam moments, step, learning rate)
  state.json             the step, and the number of micro-batches consumed (the data position)
It is written to `checkpoint.partial/` and swapped in, so a kill at any instant
leaves the previous checkpoint or the new one whole.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError

NAME = "checkpoint"


@dataclass
class TrainState:
    step: int
    batches_done: int  # micro-batches consumed: batch k of the stream is a pure function of k
    adapters: dict[str, mx.array]
    optimizer: dict[str, mx.array]  # flattened optimizer state
    # No random state: the loop re-seeds MLX from (training.seed, step) before every step.


def save(out: Path, state: TrainState) -> Path:
    final, partial, old = out / NAME, out / f"{NAME}.partial", out / f"{NAME}.old"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    mx.save_safetensors(str(partial / "adapters.safetensors"), state.adapters)
    mx.save_safetensors(str(partial / "state.safetensors"), {f"optimizer.{k}": v for k, v in state.optimizer.items()})
    (partial / "state.json").write_text(json.dumps({"step": state.step, "batches_done": state.batches_done}))
    if final.exists():
        final.rename(old)
    partial.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load(out: Path) -> TrainState | None:
    """The newest whole checkpoint in `out`, or None."""
    for folder in (out / NAME, out / f"{NAME}.old"):  # .old survives a kill between the two renames
        if (folder / "state.json").is_file():
            try:
                meta = json.loads((folder / "state.json").read_text())
                tensors = mx.load(str(folder / "state.safetensors"))
                adapters = mx.load(str(folder / "adapters.safetensors"))
            except (ValueError, RuntimeError, OSError, json.JSONDecodeError) as err:
                raise UserError(f"{folder}: unreadable checkpoint ({err}); delete it to restart training") from None
            optimizer = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
            return TrainState(meta["step"], meta["batches_done"], adapters, optimizer)
    return None


def capture(model, optimizer, step: int, batches_done: int) -> TrainState:
    from .model import adapter_weights

    return TrainState(step, batches_done, adapter_weights(model), dict(tree_flatten(optimizer.state)))


def restore(model, optimizer, state: TrainState) -> None:
    """Put adapters and optimizer state back (before the step is compiled)."""
    model.load_weights(list(state.adapters.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(state.optimizer.items()))
    mx.eval(model.parameters(), optimizer.state)
