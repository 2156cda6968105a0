"""Epoch order and the batch stream of training.

Batch k of the stream is a pure function of (pairs, seed, k): resuming skips the
first batches without packing them, and every rank draws the same global batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ..core.config import TrainingConfig
from ..data.pair_file import Pair
from .logps import Batch, pack_pairs


def epoch_order(
    pairs: list[Pair], batch_size: int, seed: int, epoch: int, buckets: int
) -> list[int]:
    """A seeded permutation of the pairs; with buckets > 1, each run of `buckets` batches is
    sorted by length before it is cut into batches, and those batches are shuffled."""
    order = np.random.default_rng([seed, epoch]).permutation(len(pairs)).tolist()
    if buckets == 1:
        return order
    rng = np.random.default_rng([seed, epoch, 1])
    out: list[int] = []
    group = batch_size * buckets
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: pairs[i].length)
        batches = [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        for b in rng.permutation(len(batches)):
            out += batches[b]
    return out


def batch_stream(
    pairs: list[Pair],
    batch_size: int,
    seed: int,
    pad: int,
    start: int = 0,
    buckets: int = 1,
    shared: bool = False,
    part: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:
    """Full batches from epoch after epoch (each visits every pair once; batch k is a pure
    function of k); `start` skips the first batches without packing them (resuming).
    With `part` = (rank, ranks), `batch_size` is the global batch and this rank gets
    every ranks-th pair of it."""
    epoch, k = 0, 0
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += epoch_order(pairs, batch_size, seed, epoch, buckets)
            epoch += 1
        if k >= start:
            yield pack_pairs(
                [pairs[i] for i in order[:batch_size][part[0] :: part[1]]], pad, shared
            )
        order = order[batch_size:]
        k += 1


def total_steps(config: TrainingConfig, n_train: int, ranks: int = 1) -> int:
    """training.iters, or the optimizer steps of training.epochs over `n_train` pairs."""
    if config.iters is not None:
        return config.iters
    return max(
        1,
        math.ceil(config.epochs * n_train / (config.batch_size * ranks * config.grad_accumulation)),
    )
