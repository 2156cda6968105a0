"""Training checkpoints: adapters, optimizer state and the data position; written atomically.

A checkpoint is a folder `checkpoint/` in the run's output:
  adapters.safetensors   the LoRA weights
  state.safetensors      the optimizer's state, flattened (its step and learning rate, and per
                         adapter matrix: Adam's m and v, SGD's and Muon's v, Adafactor's
                         exp_avg_sq_row and exp_avg_sq_col, exp_avg_sq for a vector, exp_avg
                         with beta_1)
  state.json             the step, the number of micro-batches consumed (the data position),
                         the optimizer's name and its keyword arguments; resuming with another
                         optimizer is refused
No random state is stored: the loop re-seeds MLX from (training.seed, step) before
every step. The folder is replaced with `files.atomic_folder`, so a kill at any
instant leaves the previous checkpoint or the new one whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..core import reading
from ..core.config import OPTIMIZERS
from ..core.errors import UserError
from ..core.files import atomic_folder, newest_folder
from . import distributed as dist
from .lora import adapter_weights, write_safetensors

NAME = "checkpoint"


@dataclass
class TrainState:
    step: int
    batches_done: int  # micro-batches consumed: batch k of the stream is a pure function of k
    adapters: dict[str, mx.array]
    optimizer: dict[str, mx.array]  # flattened optimizer state
    where: str = "the checkpoint"  # the folder it was read from, for messages
    optimizer_name: str | None = None  # training.optimizer; None: saved before it was kept
    optimizer_config: dict | None = None  # its keyword arguments, as the optimizer held them


def save(out: Path, state: TrainState, made_from: str | None = None) -> Path:
    """Write the checkpoint whole or not at all; `made_from` names the pairs it trained on."""
    with atomic_folder(out / NAME) as folder:
        write_safetensors(folder / "adapters.safetensors", state.adapters)
        write_safetensors(
            folder / "state.safetensors",
            {f"optimizer.{k}": v for k, v in state.optimizer.items()},
        )
        meta = {
            "step": state.step,
            "batches_done": state.batches_done,
            "pairs": made_from,
            "optimizer": state.optimizer_name,
            "optimizer_config": state.optimizer_config,
        }
        (folder / "state.json").write_text(json.dumps(meta))
    return out / NAME


def load(out: Path, made_from: Callable[[], str | None] | None = None) -> TrainState | None:
    """The newest whole checkpoint in `out`, or None. One made from other pairs than
    `made_from` (pairs.jsonl edited since) is refused, never trained on."""
    folder = newest_folder(out / NAME)
    if folder is None or not (folder / "state.json").is_file():
        return None
    try:
        meta = reading.read_json_or_none(folder / "state.json", "checkpoint state")
        tensors = mx.load(str(folder / "state.safetensors"))
        adapters = mx.load(str(folder / "adapters.safetensors"))
    except (ValueError, RuntimeError, OSError, json.JSONDecodeError) as err:
        raise UserError(
            f"{folder}: unreadable checkpoint ({err}); delete it to restart training"
        ) from None
    if not (
        isinstance(meta, dict)
        and all(type(meta.get(k)) is int and meta[k] >= 0 for k in ("step", "batches_done"))
    ):
        raise UserError(
            f"{folder / 'state.json'}: needs whole numbers 'step' and 'batches_done'; "
            "delete the checkpoint to restart training"
        )
    if not isinstance(meta.get("optimizer"), (str, type(None))) or not isinstance(
        meta.get("optimizer_config"), (dict, type(None))
    ):
        raise UserError(
            f"{folder / 'state.json'}: 'optimizer' must be a name and 'optimizer_config' a "
            "mapping; delete the checkpoint to restart training"
        )
    if made_from and meta.get("pairs") not in (None, made_from()):
        raise UserError(
            f"{folder}: made from other pairs than {out / 'pairs.jsonl'} holds now (it changed "
            "since); restore that file, or delete the checkpoint to train on it from the start"
        )
    optimizer = {
        k[len("optimizer.") :]: v for k, v in tensors.items() if k.startswith("optimizer.")
    }
    return TrainState(
        meta["step"],
        meta["batches_done"],
        adapters,
        optimizer,
        str(folder),
        meta.get("optimizer"),
        meta.get("optimizer_config"),
    )


def _layout(arrays: dict[str, mx.array]) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).split(".")[-1]] for k, v in arrays.items()}


def load_on_every_rank(
    out: Path, made_from: Callable[[], str | None] | None = None
) -> TrainState | None:
    """Rank 0's checkpoint (read from its folder; other hosts may not have it) on every rank:
    rank 0 reads it and sends what it found (an unreadable one stops every rank), then its
    arrays."""
    if dist.size() == 1:
        return load(out, made_from)
    state = None

    def read() -> dict | None:
        nonlocal state
        state = load(out, made_from)
        if state is None:
            return None
        return {
            "step": state.step,
            "batches_done": state.batches_done,
            "where": state.where,
            "optimizer_name": state.optimizer_name,
            "optimizer_config": state.optimizer_config,
            "adapters": _layout(state.adapters),
            "optimizer": _layout(state.optimizer),
        }

    meta = dist.decided(read)
    if meta is None:
        return None

    def arrays(kind: str, mine: dict[str, mx.array] | None) -> dict[str, mx.array]:
        blank = {k: mx.zeros(shape, getattr(mx, dtype)) for k, (shape, dtype) in meta[kind].items()}
        return dist.broadcast_arrays(mine if mine is not None else blank)

    return TrainState(
        meta["step"],
        meta["batches_done"],
        arrays("adapters", state and state.adapters),
        arrays("optimizer", state and state.optimizer),
        meta["where"],
        meta["optimizer_name"],
        meta["optimizer_config"],
    )


def optimizer_name(optimizer) -> str:
    """The training.optimizer of an mlx optimizer: its class's name (AdamW: adamw)."""
    return type(optimizer).__name__.lower()


def _plain(value):
    """A keyword argument as JSON holds it (a tuple a list)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def optimizer_settings(optimizer) -> dict:
    """The keyword arguments the optimizer holds (config.OPTIMIZERS names them), but its
    learning rate: what it was built with."""
    keys = OPTIMIZERS.get(optimizer_name(optimizer), {})
    return {k: _plain(getattr(optimizer, k)) for k in keys if hasattr(optimizer, k)}


def capture(model, optimizer, step: int, batches_done: int) -> TrainState:
    return TrainState(
        step,
        batches_done,
        adapter_weights(model),
        dict(tree_flatten(optimizer.state)),
        optimizer_name=optimizer_name(optimizer),
        optimizer_config=optimizer_settings(optimizer),
    )


def check_fits(where: str, what: str, saved: dict[str, mx.array], wanted: dict) -> None:
    """Every array of `saved` has its key and shape in `wanted`, and none is missing: a
    checkpoint of other adapters is refused, never loaded in part."""
    for key in sorted(set(saved) | set(wanted)):
        if key not in saved or key not in wanted or saved[key].shape != wanted[key].shape:
            have = tuple(saved[key].shape) if key in saved else "nothing"
            need = tuple(wanted[key].shape) if key in wanted else "nothing"
            raise UserError(
                f"{where}: its {what} do not fit this run ({key}: saved {have}, needed {need}); "
                "resume with the settings it was made with, or delete the checkpoint folder to "
                "train from the start"
            )


def restore(model, optimizer, state: TrainState) -> None:
    """Put adapters and optimizer state back (before the step is compiled), each checked key
    by key and shape by shape against the model's trainable adapters. A checkpoint of another
    optimizer (one saved before the name was kept was AdamW's) is refused: Adam's and AdamW's
    states, or SGD's and Muon's, fit each other key by key but mean other things."""
    made_with, now = state.optimizer_name or "adamw", optimizer_name(optimizer)
    if made_with != now:
        raise UserError(
            f"{state.where}: made with training.optimizer={made_with}, not {now}; resume with "
            f"training.optimizer={made_with} (and the optimizer_config it was made with), or "
            "delete the checkpoint folder to train from the start"
        )
    check_fits(state.where, "adapters", state.adapters, adapter_weights(model))
    model.load_weights(list(state.adapters.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    check_fits(state.where, "optimizer state", state.optimizer, dict(tree_flatten(optimizer.state)))
    optimizer.state = tree_unflatten(list(state.optimizer.items()))
    mx.eval(model.parameters(), optimizer.state)
