"""A prompt prefix run once through the blocks, and rows that continue from its keys and values.

Training runs each prompt once for its chosen and its rejected response; evaluation runs
a prefix every prompt shares (few-shot exemplars) once for all rows. Both give the
log-probs of whole rows (checked per model by probes.py) and let gradients
flow back through the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

# Tokens a pass through the blocks takes at a time on the CPU (`chunked`)
CPU_CHUNK = 128
# The class attribute of a block whose forward reruns in the backward (`trainer.recompute_blocks`)
RECOMPUTED = "_mipo_recomputed"


class RecordKV:
    """A cache for the prefix pass: keeps each layer's keys and values, differentiably. A pass
    may come in chunks of tokens (`chunked`): each chunk's keys extend the ones before it.
    Within a chunk an update is idempotent (a recomputed block reruns it in the backward)."""

    def __init__(self):
        self.offset = 0  # tokens before this chunk: its RoPE offset
        self.before = None  # (keys, values) of the chunks before this one
        self.keys = self.values = None

    def next_chunk(self) -> None:
        self.before = (self.keys, self.values)
        self.offset = self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.before is not None:
            keys = mx.concatenate([self.before[0], keys], axis=2)
            values = mx.concatenate([self.before[1], values], axis=2)
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        if window_size is not None:
            # The check falls back to no prefix
            raise NotImplementedError("sliding-window attention")
        if not return_array:
            return "causal"  # aligned to the last key: a chunk sees every token before it
        # (n, offset + n): row t sees columns <= offset + t
        return mx.arange(self.offset + n) <= self.offset + mx.arange(n)[:, None]


class AfterPrefix:
    """A cache for the rows: the prefix rows' keys and values, each repeated for the `copies`
    rows that continue it; row r sits at positions lengths[r], lengths[r]+1, ... The rows
    may come in chunks of tokens (`chunked`): each chunk's keys extend the ones before it.
    Within a chunk an update is idempotent (a recomputed block reruns it in the backward)."""

    def __init__(self, record: RecordKV, lengths: mx.array, copies: int):
        self.before = (
            mx.concatenate([record.keys] * copies),
            mx.concatenate([record.values] * copies),
        )
        self.width = record.keys.shape[2]  # the prefix's columns
        self.lengths = mx.concatenate([lengths] * copies)  # (N,)
        self.done = 0  # the rows' own tokens before this chunk
        self.offset = self.lengths  # per-row RoPE offsets
        self.keys = self.values = None

    def next_chunk(self) -> None:
        self.before = (self.keys, self.values)
        self.done = self.keys.shape[2] - self.width
        self.offset = self.lengths + self.done

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.concatenate([self.before[0], keys], axis=2)
        self.values = mx.concatenate([self.before[1], values], axis=2)
        return self.keys, self.values

    def make_mask(
        self, n: int, return_array: bool = False, window_size: int | None = None
    ) -> mx.array:
        if window_size is not None:
            raise NotImplementedError("sliding-window attention")
        width = self.width
        cols = mx.arange(width + self.done + n)
        # (N, 1, W+done+n)
        in_prompt = (cols[None, None, :] < self.lengths[:, None, None]) & (cols < width)
        # (n, W+done+n): the chunk's row t is the rows' own token done + t
        own = cols[None, :] - width
        causal = (own >= 0) & (own <= self.done + mx.arange(n)[:, None])
        return (in_prompt | causal)[:, None]  # (N, 1, n, W+done+n)


def body_and_head(model):
    """The transformer (tokens, cache -> hidden states) and the LM head of an mlx-lm model."""
    body = model.model
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return body, body.embed_tokens.as_linear
    return body, model.lm_head


def chunked(body, inputs: mx.array, cache, chunk: int | None = None) -> mx.array:
    """body(inputs, cache) -> hidden states (N, T, H), `chunk` tokens at a time (on the CPU
    `CPU_CHUNK`, elsewhere one pass): the same states, but a chunk's queries are scored
    against the keys up to its own end only, so attention skips most of the causal mask's
    hidden half. On MLX's CPU backend the softmax over the scores (an `exp` each) is most
    of attention's time; a GPU's fused attention kernel skips masked blocks itself.
    Recomputed blocks (training.grad_checkpoint) take one pass: their backward reruns each
    block's forward, and by then the caches hold the later chunks' keys too."""
    width = inputs.shape[1]
    if chunk is None:
        blocks = getattr(body, "layers", ())
        recomputed = any(getattr(b, RECOMPUTED, False) for b in blocks)
        chunk = CPU_CHUNK if mx.default_device() == mx.cpu and not recomputed else width
    if width <= chunk:
        return body(inputs, cache=cache)
    hidden = []
    for start in range(0, width, chunk):
        if start:
            for c in cache:
                c.next_chunk()
        hidden.append(body(inputs[:, start : start + chunk], cache=cache))
    return mx.concatenate(hidden, axis=1)


def prefix_keys(model, prefix: mx.array, chunk: int | None = None) -> list[RecordKV]:
    """Each layer's keys and values of the prefix rows (P, W), from one pass through the
    blocks (`chunked`; right padding is never seen by a real token)."""
    records = [RecordKV() for _ in model.layers]
    # Only the keys and values are used: the last block's output is never computed
    chunked(body_and_head(model)[0], prefix, records, chunk)
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
