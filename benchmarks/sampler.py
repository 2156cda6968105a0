"""The batched sampler alone: mipo_mlx's (nucleus from bucket masses, two-level inverse CDF)
against the whole-sort sampler it replaced, on the same log-probs and uniforms, in one process.

    python benchmarks/sampler.py            # 4 shapes, median of 25 calls each (seconds)

Shapes (rows, vocabulary): a decode step's batch at a 32k and a 152k vocabulary, with flat
rows (a random-init model: top-p 0.9 keeps most of the vocabulary) and peaked ones (a
trained model). Calls alternate between the sides. Prints milliseconds per call, the ratio
and whether both drew the same tokens; the last line is `sampler_speedup=<x>` (the median of
the shapes' ratios).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

import mipo_mlx  # noqa: F401  (first: the BLAS)
from mipo_mlx.engine.generation import sample_rows

SHAPES = [  # rows, vocabulary, logit scale (1: flat, 5: peaked)
    (16, 32000, 1.0),
    (32, 32000, 1.0),
    (16, 32000, 5.0),
    (16, 151936, 1.0),
]
TEMPERATURE, TOP_P = 0.7, 0.9


def whole_sort(logprobs: np.ndarray, uniforms: np.ndarray, temperature: float, top_p: float):
    """The previous sampler: the nucleus from one sort of every row's probabilities, the draw
    from a float64 cumulative sum over the whole vocabulary."""
    top = logprobs.max(axis=-1, keepdims=True)
    weights = np.exp((logprobs - top) * (1.0 / temperature))
    probs = np.exp(logprobs)
    ordered = np.sort(probs, axis=-1)[:, ::-1]
    kept = ((np.cumsum(ordered, axis=-1) - ordered) < top_p).sum(axis=-1)
    floor = np.take_along_axis(ordered, kept[:, None] - 1, axis=-1)
    weights = np.where(probs >= floor, weights, 0.0)
    cumulative = np.cumsum(weights, axis=-1, dtype=np.float64)
    target = uniforms * cumulative[:, -1]
    picked = (cumulative <= target[:, None]).sum(axis=-1)
    last = weights.shape[-1] - 1 - (weights[:, ::-1] > 0).argmax(axis=-1)
    return np.minimum(picked, last)


def main() -> None:
    rng = np.random.default_rng(0)
    ratios = []
    header = "rows | vocabulary | distribution | whole sort ms | mipo_mlx ms | ratio | same tokens"
    print(f"| {header} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rows, vocab, scale in SHAPES:
        logits = rng.normal(size=(rows, vocab)) * scale
        shifted = logits - logits.max(-1, keepdims=True)
        logprobs = (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))).astype(np.float32)
        uniforms = rng.random(rows)
        times: dict = {whole_sort: [], sample_rows: []}
        for _ in range(26):
            for side in times:
                tic = time.perf_counter()
                side(logprobs, uniforms, TEMPERATURE, TOP_P)
                times[side].append(time.perf_counter() - tic)
        old, new = (1000 * statistics.median(t[1:]) for t in times.values())  # first: warm-up
        same = np.array_equal(
            whole_sort(logprobs, uniforms, TEMPERATURE, TOP_P),
            sample_rows(logprobs, uniforms, TEMPERATURE, TOP_P),
        )
        kind = "flat" if scale == 1 else "peaked"
        print(f"| {rows} | {vocab} | {kind} | {old:.1f} | {new:.1f} | {old / new:.2f} | {same} |")
        ratios.append(old / new)
    print(f"sampler_speedup={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
