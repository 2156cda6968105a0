"""Scoring many rows at once, within token and logits budgets: each response under its prompt
(`response_logps`), each prompt's several responses with the prompt run once
(`grouped_logps`), and pairs as training packs them (`score_pairs`). The fast paths are
taken where probes.py finds this model gives the same log-probs with them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from .batching import PAD_MULTIPLE, _width, pack_grouped, pack_pairs, pack_rows
from .logps import summed_logps
from .prefix import (
    common_prefix,
    prefix_keys,
)
from .probes import head_only_works, prefix_reuse_works

# Logits one scoring batch may hold (float32 values, 128 MB): at a 32k vocabulary 1,024
# scored positions, at 128k 256. The logits, not the tokens, set a scoring batch's peak.
LOGITS_BUDGET = 1 << 25


def response_logps(
    model,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    token_budget: int = 16384,
    min_shared: int = 64,
    on_batch: Callable[[int], None] | None = None,
    logits_budget: int = LOGITS_BUDGET,
) -> np.ndarray:
    """log p(response_r | prompt_r) for each row r, (N,), in batches of about `token_budget`
    padded tokens and at most `logits_budget` logits (rows sorted by length; one mx.eval per
    batch; a row longer than the budgets is a batch of its own). When the model allows it,
    the LM head runs on the response positions only, and a prefix all prompts share (a
    few-shot prompt's exemplars, at least `min_shared` tokens) runs once, the rows attending
    to its keys and values; otherwise full logits are computed, a few rows at a time.
    `on_batch(n)` is called after each batch of n rows."""
    head_only = head_only_works(model)
    start = common_prefix(prompts) if head_only else 0
    records = None
    if start >= min_shared and prefix_reuse_works(model):
        records = prefix_keys(model, mx.array([list(prompts[0][:start])]))
        mx.eval([(r.keys, r.values) for r in records])
    else:
        start = 0
    vocab = getattr(getattr(model, "args", None), "vocab_size", None) or 1
    positions = max(1, logits_budget // vocab)  # scored positions (head only) in a batch
    # Without head_only every padded position gets logits
    budget = token_budget if head_only else min(token_budget, 2048, positions)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    width = [
        _width(len(prompts[i]) - start + len(responses[i]), PAD_MULTIPLE)
        for i in range(len(prompts))
    ]
    out = np.zeros(len(prompts))
    first = 0
    while first < len(order):
        end, scored = first + 1, len(responses[order[first]])
        while (
            end < len(order)
            and (end + 1 - first) * width[order[end]] <= budget
            and (not head_only or scored + len(responses[order[end]]) <= positions)
        ):
            scored += len(responses[order[end]])
            end += 1
        rows = order[first:end]
        packed = pack_rows([prompts[i][start:] for i in rows], [responses[i] for i in rows], pad_id)
        out[rows] = summed_logps(model, packed.tree(), records, head_only)
        first = end
        if on_batch is not None:
            on_batch(len(rows))
    return out


def grouped_logps(
    model,
    prompts: Sequence[list[int]],
    columns: Sequence[Sequence[list[int]]],
    pad_id: int,
    token_budget: int = 16384,
    on_batch: Callable[[int], None] | None = None,
    logits_budget: int = LOGITS_BUDGET,
) -> np.ndarray:
    """log p(columns[c][i] | prompts[i]) for every column c and prompt i, (G, P): each prompt
    runs once through the blocks for its G responses (`pack_grouped`), in batches of whole
    prompts within both budgets (prompts sorted by length). The model must take a prompt
    prefix (`prefix_reuse_works`). `on_batch(n)` is called after each batch of n rows."""
    n_columns = len(columns)
    vocab = getattr(getattr(model, "args", None), "vocab_size", None) or 1
    positions = max(1, logits_budget // vocab)
    size = [
        (len(prompts[i]), max(len(column[i]) for column in columns)) for i in range(len(prompts))
    ]
    order = sorted(range(len(prompts)), key=lambda i: sum(size[i]))
    out = np.zeros((n_columns, len(prompts)))
    first = 0
    while first < len(order):
        end = first + 1
        while end < len(order):
            prompt, response = size[order[end]]
            width = _width(prompt, PAD_MULTIPLE) + n_columns * _width(response + 1, PAD_MULTIPLE)
            if (end + 1 - first) * width > token_budget or (
                (end + 1 - first) * n_columns * response > positions
            ):
                break
            end += 1
        batch = order[first:end]
        packed = pack_grouped(
            [prompts[i] for i in batch], [[column[i] for i in batch] for column in columns], pad_id
        )
        out[:, batch] = summed_logps(model, packed.tree(), head_only=True).reshape(n_columns, -1)
        first = end
        if on_batch is not None:
            on_batch(n_columns * len(batch))
    return out


def score_pairs(
    model,
    pairs,
    pad_id: int,
    batch_size: int,
    shared: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, float]]:
    """Log-probs of every pair's chosen and rejected response; one mx.eval per batch.

    Pairs are sorted by length so that batches hold rows of similar width.
    """
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pack_pairs([pairs[i] for i in idx], pad_id, shared).tree()
        logps = summed_logps(model, batch).tolist()  # (2B,): chosen rows, then rejected
        for i, c, r in zip(idx, logps[: len(idx)], logps[len(idx) :]):
            out[i] = (c, r)
        if on_batch is not None:
            on_batch(len(idx))
    return out
