"""Data-parallel runs over MLX's own distributed layer (`mx.distributed`, `mlx.launch`).

One process per rank: every rank holds the model, generates and scores its share of
the prompts, and sees every result (gathered), so all ranks build the same pairs and
draw the same batches. In training each rank takes its slice of the global batch
and the gradients are averaged across ranks every step. Outside `mlx.launch` the
group has one rank and nothing here costs anything.

Rank 0 decides, every rank follows: whatever only rank 0 can know (its files: cached
responses, pairs, evaluations, checkpoints; the output folder's name) reaches the
other ranks through `decided`, so every rank takes the same branch and meets the same
collectives. Rank 0 alone writes (`main_only`) and prints (`say`, `progress`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TypeVar

import mlx.core as mx
import numpy as np

from ..core.errors import UserError
from ..core.progress import Progress

T = TypeVar("T")


@lru_cache(maxsize=1)
def group():
    """The global group: the one `mlx.launch` set up, or a single rank."""
    return mx.distributed.init()


def rank() -> int:
    return group().rank()


def size() -> int:
    return group().size()


def is_main() -> bool:
    return rank() == 0


def shard(n: int) -> list[int]:
    """The indices of n items this rank works on: rank, rank + size, ..."""
    return list(range(rank(), n, size()))


def _all_sum_cpu(x: mx.array) -> mx.array:
    return mx.distributed.all_sum(x, stream=mx.cpu)


def all_gather_objects(obj) -> list:
    """Every rank's JSON-able object, in rank order (a collective: all ranks must call it)."""
    if size() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    lengths = np.zeros(size(), dtype=np.int32)
    lengths[rank()] = len(data)
    lengths = np.array(_all_sum_cpu(mx.array(lengths)))
    # int32: all_sum of uint8 could overflow
    table = np.zeros((size(), int(lengths.max())), dtype=np.int32)
    table[rank(), : len(data)] = data
    table = np.array(_all_sum_cpu(mx.array(table)))
    return [
        json.loads(bytes(table[r, : lengths[r]].astype(np.uint8)).decode()) for r in range(size())
    ]


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    return all_gather_objects(obj if is_main() else None)[0]


def decided(read: Callable[[], T]) -> T:
    """Rank 0 decides, every rank follows: `read` runs on rank 0 alone and its JSON-able
    result reaches every rank (a collective: all ranks must call it). A UserError that
    `read` raises is raised on every rank."""
    if size() == 1:
        return read()
    mine = None
    if is_main():
        try:
            mine = {"value": read()}
        except UserError as err:
            mine = {"error": str(err)}
    got = broadcast_object(mine)
    if "error" in got:
        raise UserError(got["error"])
    return got["value"]


def main_only(write: Callable[..., object], *args, **kwargs) -> None:
    """Run `write` on rank 0 alone (the rank that owns the output folder)."""
    if is_main():
        write(*args, **kwargs)


def say(message: str) -> None:
    """A note for the user, printed by rank 0 alone."""
    if is_main():
        print(message, file=sys.stderr, flush=True)


def progress(total: int, stage: str) -> Progress:
    """A progress line that rank 0 alone shows."""
    return Progress(total, stage, enabled=is_main())


@contextmanager
def together() -> Iterator[None]:
    """Checks every rank runs: a UserError on any rank stops every rank with its message,
    so none is left waiting in a collective for a rank that quit."""
    if size() == 1:
        yield
        return
    error = None
    try:
        yield
    except UserError as err:
        error = str(err)
    agree(error)


def broadcast_arrays(arrays: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rank 0's arrays on every rank (the others pass arrays of the same shapes and dtypes)."""
    if size() == 1:
        return arrays
    out = {}
    for name, value in arrays.items():
        out[name] = _all_sum_cpu(value if is_main() else mx.zeros_like(value))
    mx.eval(out)
    return out


def agree(error: str | None) -> None:
    """A collective check: when any rank met a problem, every rank stops with it (no rank is
    left waiting in a collective for one that quit)."""
    errors = [e for e in all_gather_objects(error) if e]
    if errors:
        raise UserError(errors[0])


def average_gradients(grads):
    """Mean of each gradient over the ranks (identity on one rank)."""
    if size() == 1:
        return grads
    from mlx.nn.utils import average_gradients as mlx_average

    return mlx_average(grads)


def mean_over_ranks(values: dict[str, mx.array]) -> dict[str, mx.array]:
    if size() == 1:
        return values
    n = size()
    return {k: mx.distributed.all_sum(v) / n for k, v in values.items()}


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop request, say)."""
    if size() == 1:
        return flag
    return _all_sum_cpu(mx.array([1.0 if flag else 0.0])).item() > 0


def lost_peer(err: BaseException) -> bool:
    """Whether an error is MLX's distributed layer reporting a rank that went away."""
    return (
        size() > 1
        and isinstance(err, RuntimeError)
        and any(word in str(err) for word in ("[ring]", "[mpi]", "[jaccl]", "[nccl]", "peer"))
    )


def describe() -> str:
    return f"rank {rank()} of {size()}"
