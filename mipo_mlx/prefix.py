"""A prompt prefix run once through the blocks, and rows that continue from its keys and values.

Training runs each prompt once for its chosen and its rejected response; evaluation runs
a prefix every prompt shares (few-shot exemplars) once for all rows. Both give the
log-probs of whole rows (checked per model by the probes in score.py) and let gradients
flow back through the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx


class RecordKV:
    """A cache for the prefix pass: keeps each layer's keys and values, differentiably."""

    offset = 0
    keys = values = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        if window_size is not None:
            # The check falls back to no prefix
            raise NotImplementedError("sliding-window attention")
        if not return_array:
            return "causal"
        return mx.arange(n)[:, None] >= mx.arange(n)[None]  # (n, n): row t sees columns <= t


class AfterPrefix:
    """A cache for the rows: the prefix rows' keys and values, each repeated for the `copies`
    rows that continue it; row r sits at positions lengths[r], lengths[r]+1, ..."""

    def __init__(self, record: RecordKV, lengths: mx.array, copies: int):
        self.prefix = (
            mx.concatenate([record.keys] * copies),
            mx.concatenate([record.values] * copies),
        )
        self.lengths = mx.concatenate([lengths] * copies)  # (N,)
        self.offset = self.lengths  # per-row RoPE offsets
        self.keys = self.values = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.concatenate([self.prefix[0], keys], axis=2)
        self.values = mx.concatenate([self.prefix[1], values], axis=2)
        return self.keys, self.values

    def make_mask(
        self, n: int, return_array: bool = False, window_size: int | None = None
    ) -> mx.array:
        if window_size is not None:
            raise NotImplementedError("sliding-window attention")
        width = self.prefix[0].shape[2]
        cols = mx.arange(width + n)
        # (N, 1, W+n)
        in_prompt = (cols[None, None, :] < self.lengths[:, None, None]) & (cols < width)
        # (n, W+n)
        causal = (cols[None, :] >= width) & (cols[None, :] - width <= mx.arange(n)[:, None])
        return (in_prompt | causal)[:, None]  # (N, 1, n, W+n)


def body_and_head(model):
    """The transformer (tokens, cache -> hidden states) and the LM head of an mlx-lm model."""
    body = model.model
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return body, body.embed_tokens.as_linear
    return body, model.lm_head


def prefix_keys(model, prefix: mx.array) -> list[RecordKV]:
    """Each layer's keys and values of the prefix rows (P, W), from one pass through the blocks."""
    records = [RecordKV() for _ in model.layers]
    body_and_head(model)[0](prefix, cache=records)  # only the keys and values are used
    return records


def common_prefix(prompts: Sequence[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least its last token."""
    if not prompts:
        return 0
    shortest = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < shortest and all(p[n] == first[n] for p in prompts):
        n += 1
    return n
