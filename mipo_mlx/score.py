"""Summed response log-probs of (prompt, response) token sequences.

Chosen and rejected go through the model in one batched forward. Only response
tokens are scored: the prompt is masked, the stop token the model generated is
scored, padding never is, and nothing is length-normalised (MIPO.md, step 6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_causal_mask

PAD_MULTIPLE = 32  # fewer distinct shapes -> fewer recompiles of the compiled step


@dataclass
class Batch:
    """B pairs packed as 2B rows: chosen rows first, then rejected rows.

    With a shared prompt (`prefix` not empty), each prompt but its last token runs
    once (B rows of `prefix`), and the 2B rows hold the last prompt token and the
    response, attending to the prompt's keys and values. Without (`prefix` of
    width 0), the rows hold prompt and response whole. Both give the same log-probs.
    Only the K scored positions (response tokens; K rounded up with dummies of weight
    0) go through the log-softmax, and with a shared prompt, through the LM head.
    """

    prefix: mx.array  # (B, P) prompt tokens but the last, right-padded; (B, 0) unshared
    prefix_lengths: mx.array  # (B,) real tokens in each prefix row
    inputs: mx.array  # (2B, T) token ids fed to the model
    positions: mx.array  # (K,) flat indices row * T + t of the scored positions
    targets: mx.array  # (K,) the token each scored position predicts
    owners: mx.array  # (K, 2B) 1.0 where position k belongs to row r (0 for the dummies)
    reference_chosen: mx.array  # (B,) stored reference log-probs
    reference_rejected: mx.array  # (B,)
    n_tokens: int  # real (non-padding) tokens that go through the model, for throughput

    @property
    def n_pairs(self) -> int:
        return self.inputs.shape[0] // 2

    @property
    def shared(self) -> bool:
        return self.prefix.shape[1] > 0

    def arrays(self) -> tuple[mx.array, ...]:
        return (self.prefix, self.prefix_lengths, self.inputs, self.positions, self.targets, self.owners,
                self.reference_chosen, self.reference_rejected)


def _width(longest: int, pad_multiple: int) -> int:
    return -(-max(longest, 1) // pad_multiple) * pad_multiple


def pack(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int,
         pad_multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows prompt+response, right-padded; the mask marks targets that are response tokens.

    For a row with prompt length P and response length R, the input position t
    predicts token t+1, so the mask is 1 for t in [P-1, P+R-2].
    """
    lengths = [len(p) + len(r) - 1 for p, r in zip(prompts, responses)]
    width = _width(max(lengths), pad_multiple)
    inputs = np.full((len(lengths), width), pad_id, dtype=np.int32)
    targets = np.full((len(lengths), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(lengths), width), dtype=np.float32)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        inputs[row, : len(seq) - 1] = seq[:-1]
        targets[row, : len(seq) - 1] = seq[1:]
        mask[row, len(p) - 1 : len(seq) - 1] = 1.0
    return inputs, targets, mask


def scored_positions(targets: np.ndarray, mask: np.ndarray, pad_multiple: int = PAD_MULTIPLE):
    """(positions, targets, owners) of the masked entries of (N, T) arrays; see Batch."""
    rows, cols = np.nonzero(mask)
    k = _width(len(rows), pad_multiple)
    positions = np.zeros(k, dtype=np.int32)
    picked = np.zeros(k, dtype=np.int32)
    owners = np.zeros((k, mask.shape[0]), dtype=np.float32)
    positions[: len(rows)] = rows * mask.shape[1] + cols
    picked[: len(rows)] = targets[rows, cols]
    owners[np.arange(len(rows)), rows] = 1.0
    return mx.array(positions), mx.array(picked), mx.array(owners)


def pack_pairs(pairs, pad_id: int, shared: bool = False, pad_multiple: int = PAD_MULTIPLE) -> Batch:
    """Pack pairs for one forward; `shared` runs each prompt once for both responses."""
    ref = [p.reference_logps or {"chosen": 0.0, "rejected": 0.0} for p in pairs]
    reference = (mx.array([r["chosen"] for r in ref], dtype=mx.float32),
                 mx.array([r["rejected"] for r in ref], dtype=mx.float32))
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    if not shared:
        prompts = [p.prompt_ids for p in pairs] * 2
        inputs, targets, mask = pack(prompts, responses, pad_id, pad_multiple)
        n_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
        return Batch(mx.zeros((len(pairs), 0), mx.int32), mx.zeros((len(pairs),), mx.int32), mx.array(inputs),
                     *scored_positions(targets, mask, pad_multiple), *reference, n_tokens)
    heads = [p.prompt_ids[:-1] for p in pairs]
    prefix = np.full((len(pairs), _width(max(map(len, heads)), pad_multiple)), pad_id, dtype=np.int32)
    for row, head in enumerate(heads):
        prefix[row, : len(head)] = head
    # The rows start at the last prompt token, whose output predicts the first response token.
    inputs, targets, mask = pack([p.prompt_ids[-1:] for p in pairs] * 2, responses, pad_id, pad_multiple)
    n_tokens = sum(map(len, heads)) + sum(len(r) + 1 for r in responses)
    return Batch(mx.array(prefix), mx.array([len(h) for h in heads], dtype=mx.int32), mx.array(inputs),
                 *scored_positions(targets, mask, pad_multiple), *reference, n_tokens)


class _RecordKV:
    """A cache for the prompt pass: keeps each layer's keys and values, differentiably."""

    offset = 0
    keys = values = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        if window_size is not None:
            raise NotImplementedError("sliding-window attention")  # the check falls back to unshared
        return create_causal_mask(n) if return_array else "causal"


class _AfterPrefix:
    """A cache for the response pass: the prompt's keys and values, repeated for the
    chosen and the rejected rows; row r sits at positions lengths[r], lengths[r]+1, ..."""

    def __init__(self, record: _RecordKV, lengths: mx.array, copies: int):
        self.prefix = (mx.concatenate([record.keys] * copies), mx.concatenate([record.values] * copies))
        self.lengths = mx.concatenate([lengths] * copies)  # (2B,)
        self.offset = self.lengths  # per-row RoPE offsets
        self.keys = self.values = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.concatenate([self.prefix[0], keys], axis=2)
        self.values = mx.concatenate([self.prefix[1], values], axis=2)
        return self.keys, self.values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        if window_size is not None:
            raise NotImplementedError("sliding-window attention")
        width = self.prefix[0].shape[2]
        cols = mx.arange(width + n)
        in_prompt = (cols[None, None, :] < self.lengths[:, None, None]) & (cols < width)  # (2B, 1, W+n)
        causal = (cols[None, :] >= width) & (cols[None, :] - width <= mx.arange(n)[:, None])  # (n, W+n)
        return (in_prompt | causal)[:, None]  # (2B, 1, n, W+n)


def body_and_head(model):
    """The transformer (tokens, cache -> hidden states) and the LM head of an mlx-lm model."""
    body = model.model
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return body, body.embed_tokens.as_linear
    return body, model.lm_head


def scored_logits(model, prefix: mx.array, prefix_lengths: mx.array, inputs: mx.array,
                  positions: mx.array) -> mx.array:
    """Logits (K, V) at the scored positions of the rows. With a non-empty prefix, the rows
    continue their prompt's prefix (row r and row r + B share prefix r), which runs once
    through the blocks; only the scored positions go through the LM head."""
    if prefix.shape[1] == 0:
        logits = model(inputs)  # (N, T, V)
        return logits.reshape(-1, logits.shape[-1])[positions]
    body, head = body_and_head(model)
    records = [_RecordKV() for _ in model.layers]
    body(prefix, cache=records)  # only the keys and values are used
    copies = inputs.shape[0] // prefix.shape[0]
    hidden = body(inputs, cache=[_AfterPrefix(r, prefix_lengths, copies) for r in records])  # (N, T, H)
    return head(hidden.reshape(-1, hidden.shape[-1])[positions])


def head_only_works(model, tolerance: float = 1e-3) -> bool:
    """Whether this model's blocks and LM head, called directly, give its own logits (then the
    head may run on the scored positions alone; a model that scales or caps its logits in
    `__call__`, or has no separate blocks, does not)."""
    try:
        ids = mx.arange(8)[None]
        body, head = body_and_head(model)
        return _close(head(body(ids)).astype(mx.float32), model(ids).astype(mx.float32), tolerance)
    except Exception:  # no .model / .layers, or blocks that need other arguments
        return False


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


def _prefix_keys(model, prefix: list[int]) -> list[_RecordKV]:
    body, _ = body_and_head(model)
    records = [_RecordKV() for _ in model.layers]
    body(mx.array([prefix]), cache=records)
    mx.eval([(r.keys, r.values) for r in records])
    return records


def _rows_logps(model, records, start: int, prompts, responses, pad_id: int) -> mx.array:
    """Summed response log-probs of rows (prompt[start:], response), the LM head on response
    positions only; with `records`, the rows continue the keys and values of a common prefix
    of `start` tokens (run once)."""
    body, head = body_and_head(model)
    inputs, targets, mask = pack([p[start:] for p in prompts], responses, pad_id)
    positions, picked, owners = scored_positions(targets, mask)
    cache = None
    if records is not None:
        cache = [_AfterPrefix(r, mx.array([start], dtype=mx.int32), len(prompts)) for r in records]
    hidden = body(mx.array(inputs), cache=cache)
    logits = head(hidden.reshape(-1, hidden.shape[-1])[positions]).astype(mx.float32)  # (K, V)
    return (mx.take_along_axis(logits, picked[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)) @ owners


def prefix_reuse_works(model, tolerance: float = 1e-3) -> bool:
    """Whether rows continuing a common prefix's keys and values get the log-probs of whole rows."""
    try:
        prompts, responses = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7]], [[8, 9], [10, 11, 12]]
        whole = _rows_logps(model, None, 0, prompts, responses, 0)
        return _close(_rows_logps(model, _prefix_keys(model, prompts[0][:4]), 4, prompts, responses, 0), whole,
                      tolerance)
    except Exception:  # blocks that reject the caches
        return False


def response_logps(model, prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int,
                   token_budget: int = 16384, min_shared: int = 64) -> np.ndarray:
    """log p(response_r | prompt_r) for each row r, (N,), in batches of about `token_budget`
    padded tokens (rows sorted by length; one mx.eval per batch). When the model allows it,
    the LM head runs on the response positions only, and a prefix all prompts share (a
    few-shot prompt's exemplars, at least `min_shared` tokens) runs once, the rows attending
    to its keys and values; otherwise full logits are computed, a few rows at a time."""
    head_only = head_only_works(model)
    start = common_prefix(prompts) if head_only else 0
    records = None
    if start >= min_shared and prefix_reuse_works(model):
        records = _prefix_keys(model, list(prompts[0][:start]))
    else:
        start = 0
    budget = token_budget if head_only else min(token_budget, 2048)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    width = [_width(len(prompts[i]) - start + len(responses[i]), PAD_MULTIPLE) for i in range(len(prompts))]
    out = np.zeros(len(prompts))
    first = 0
    while first < len(order):
        end = first + 1
        while end < len(order) and (end + 1 - first) * width[order[end]] <= budget:
            end += 1
        rows = order[first:end]
        chunk_prompts, chunk_responses = [prompts[i] for i in rows], [responses[i] for i in rows]
        if head_only:
            logps = _rows_logps(model, records, start, chunk_prompts, chunk_responses, pad_id)
        else:
            logps = sequence_logps(model, *map(mx.array, pack(chunk_prompts, chunk_responses, pad_id)))
        mx.eval(logps)
        out[rows] = np.array(logps.tolist())
        first = end
    return out


def token_logps(logits: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Sum over masked positions of log p(target): (N, T, V) -> (N,)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (N, T)
    return ((picked - mx.logsumexp(logits, axis=-1)) * mask).sum(axis=-1)


def logits_and_logps(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """The logits (N, T, V), and the sum over masked positions of log p(target | inputs so far) (N,)."""
    logits = model(inputs).astype(mx.float32)
    return logits, token_logps(logits, targets, mask)


def sequence_logps(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Sum over masked positions of log p(target | inputs so far): (N, T) -> (N,)."""
    return token_logps(model(inputs), targets, mask)


def batch_logps(model, prefix, prefix_lengths, inputs, positions, targets, owners) -> tuple[mx.array, mx.array]:
    """(chosen, rejected) summed log-probs, each (B,), from one forward of 2B rows."""
    logits = scored_logits(model, prefix, prefix_lengths, inputs, positions).astype(mx.float32)  # (K, V)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)  # (K,)
    logps = picked @ owners  # (2B,): each row's sum; the dummies weigh 0
    n = inputs.shape[0] // 2
    return logps[:n], logps[n:]


def pair_logps(model, batch: Batch) -> tuple[mx.array, mx.array]:
    return batch_logps(model, *batch.arrays()[:6])


def sharing_works(model, pairs, pad_id: int, tolerance: float = 1e-3) -> bool:
    """Whether this model's attention takes a shared prompt prefix (standard mlx-lm attention
    with RoPE offsets and caches does; sliding windows and other layouts may not): the
    two packings must give the same log-probs on these pairs."""
    try:
        shared = mx.concatenate(pair_logps(model, pack_pairs(pairs, pad_id, shared=True)))
        plain = mx.concatenate(pair_logps(model, pack_pairs(pairs, pad_id, shared=False)))
        return _close(shared, plain, tolerance)
    except Exception:  # an architecture whose attention rejects the caches: the plain packing it is
        return False


def _close(got: mx.array, want: mx.array, tolerance: float) -> bool:
    """Equal up to `tolerance`, relative to the largest |want| (absolute below 1)."""
    return mx.abs(got - want).max().item() <= tolerance * max(1.0, mx.abs(want).max().item())


def score_pairs(model, pairs, pad_id: int, batch_size: int, shared: bool = False,
                on_batch: Callable[[int], None] | None = None) -> list[tuple[float, float]]:
    """Log-probs of every pair's chosen and rejected response; one mx.eval per batch.

    Pairs are sorted by length so that batches hold rows of similar width.
    """
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chosen, rejected = pair_logps(model, pack_pairs([pairs[i] for i in idx], pad_id, shared))
        mx.eval(chosen, rejected)  # one evaluation for the whole batch; a sync point
        for i, c, r in zip(idx, chosen.tolist(), rejected.tolist()):
            out[i] = (c, r)
        if on_batch is not None:
            on_batch(len(idx))
    return out
