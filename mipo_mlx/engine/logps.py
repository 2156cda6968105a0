"""Summed response log-probs of (prompt, response) token sequences.

One primitive (`token_logps`: log p(target) = logit[target] - logsumexp(logits)) and
one packing (`Rows`: token rows, the scored positions and the row each belongs to)
serve training batches, evaluation rows and the export check. Only response tokens
are scored: the prompt is masked, the stop token the model generated is scored,
padding never is, and nothing is length-normalised (MIPO's DPO log-probs are sums
over the response). Chosen and rejected go through the model in one batched forward.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .prefix import (
    AfterPrefix,
    RecordKV,
    body_and_head,
    chunked,
    prefix_keys,
)

LOG2E = 1.4426950408889634
# Rows a CPU log-softmax takes at a time: its (rows, V) temporary, not a second (K, V) array
SOFTMAX_ROWS = 128


def token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """log p(target) under each row of logits: (K, V), (K,) -> (K,), in float32."""
    logits = logits.astype(mx.float32)
    if mx.default_device() == mx.cpu:
        return _cpu_token_logps(logits, targets)
    return mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(
        logits, axis=-1
    )


def _exp(x: mx.array) -> mx.array:
    """e ** x as 2 ** (x log2 e): on MLX's CPU backend `power` runs about twice as fast as
    `exp` (BENCHMARKS.md, "Interleaved quick run") and is as exact (both within 4e-6 of float64)."""
    return mx.power(2.0, x * LOG2E)


@mx.custom_function
def _cpu_token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """`token_logps` for MLX's CPU backend, where the two passes of `exp` over (K, V) (one
    forward, one in the gradient) are most of the log-softmax's time: both use `_exp`."""
    top = logits.max(axis=-1, keepdims=True)  # (K, 1)
    # SOFTMAX_ROWS at a time: the exponentials of all rows would be a (K, V) array
    step = SOFTMAX_ROWS
    sums = [
        _exp(logits[s : s + step] - top[s : s + step]).sum(axis=-1)
        for s in range(0, logits.shape[0], step)
    ]
    logsumexp = mx.log(mx.concatenate(sums)) + top[:, 0]
    return mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - logsumexp


@_cpu_token_logps.vjp
def _cpu_token_logps_vjp(primals, cotangent, output):
    # d logp_k / d logits_k = onehot(target_k) - softmax(logits_k)
    logits, targets = primals
    cot = cotangent[:, None]  # (K, 1)
    logsumexp = mx.take_along_axis(logits, targets[:, None], axis=-1) - output[:, None]
    # One element-wise pass (fused when compiled) and one (K, V) array: no scatter copy
    onehot = mx.arange(logits.shape[-1]) == targets[:, None]
    grad = cot * (onehot.astype(mx.float32) - _exp(logits - logsumexp))  # (K, V)
    return grad, mx.zeros_like(targets)


def scored_logits(
    model,
    rows: dict[str, mx.array],
    records: list[RecordKV] | None = None,
    head_only: bool = False,
) -> mx.array:
    """Logits (K, V) at the scored positions of `rows` (a `Rows.tree()`).

    A prefix in the rows runs once through the blocks; `records` are the keys and values
    of a prefix computed before (one row, shared by all rows). With a prefix or
    `head_only`, only the scored positions go through the LM head; otherwise the model's
    own call gives every position's logits (for models that change logits in `__call__`)."""
    inputs, positions = rows["inputs"], rows["positions"]
    if rows["prefix"].shape[1] > 0:
        records = prefix_keys(model, rows["prefix"])
        lengths = rows["prefix_lengths"]
    elif records is not None:
        lengths = mx.array([records[0].keys.shape[2]], dtype=mx.int32)
    elif not head_only:
        logits = model(inputs)  # (N, T, V)
        return logits.reshape(-1, logits.shape[-1])[positions]
    body, head = body_and_head(model)
    if records is None:  # a model may take no caches: one pass
        hidden = body(inputs)
    else:
        cache = [AfterPrefix(r, lengths, inputs.shape[0] // r.keys.shape[0]) for r in records]
        hidden = chunked(body, inputs, cache)  # (N, T, H)
    return head(hidden.reshape(-1, hidden.shape[-1])[positions])


def row_logps(
    model,
    rows: dict[str, mx.array],
    records: list[RecordKV] | None = None,
    head_only: bool = False,
) -> mx.array:
    """Each row's summed log-prob of its scored tokens, (N,)."""
    logps = token_logps(scored_logits(model, rows, records, head_only), rows["targets"])  # (K,)
    return logps @ rows["owners"]  # (N,): each row's sum; the dummies weigh 0


def summed_logps(
    model, rows: dict[str, mx.array], records: list[RecordKV] | None = None, head_only=False
) -> np.ndarray:
    """`row_logps` for scoring without gradients, (N,), with one evaluation (a sync point).
    On the CPU the log-softmax runs in numpy: MLX's CPU exp is ~20x slower than numpy's, and
    over a 32k vocabulary it costs as much as the LM head's matmul."""
    if mx.default_device() != mx.cpu:
        logps = row_logps(model, rows, records, head_only)
        mx.eval(logps)
        return np.array(logps.tolist())
    logits = scored_logits(model, rows, records, head_only).astype(mx.float32)  # (K, V)
    picked = mx.take_along_axis(logits, rows["targets"][:, None], axis=-1)[:, 0]  # (K,)
    mx.eval(logits, picked)
    z = np.asarray(logits)  # (K, V), MLX's own buffer (no copy)
    logsumexp = np.empty(len(z), dtype=np.float32)  # (K,)
    step = SOFTMAX_ROWS  # a whole copy would double memory
    for start in range(0, len(z), step):
        part = z[start : start + step]
        top = part.max(axis=1)
        shifted = part - top[:, None]
        np.exp(shifted, out=shifted)
        logsumexp[start : start + step] = np.log(shifted.sum(axis=1)) + top
    token = np.asarray(picked) - logsumexp  # (K,)
    return (token.astype(np.float64) @ np.asarray(rows["owners"], dtype=np.float64)).astype(
        np.float32
    )


def pair_logps(model, batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
    """(chosen, rejected) summed log-probs, each (B,), from one forward of the 2B rows."""
    logps = row_logps(model, batch)
    n = batch["inputs"].shape[0] // 2
    return logps[:n], logps[n:]


def sequence_logps(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Sum over masked positions of log p(target | inputs so far), from full logits:
    (N, T) -> (N,)."""
    logits = model(inputs)  # (N, T, V)
    logps = token_logps(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))  # (N * T,)
    return (logps.reshape(targets.shape) * mask).sum(axis=-1)
