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

PAD_MULTIPLE = 32  # fewer distinct shapes -> fewer recompiles of the compiled step


@dataclass
class Batch:
    """B pairs packed as 2B rows: chosen rows first, then rejected rows."""

    inputs: mx.array  # (2B, T) token ids fed to the model
    targets: mx.array  # (2B, T) next-token ids
    mask: mx.array  # (2B, T) 1.0 where the target is a response token
    reference_chosen: mx.array  # (B,) stored reference log-probs
    reference_rejected: mx.array  # (B,)
    n_tokens: int  # real (non-padding) tokens in the rows, for throughput

    @property
    def n_pairs(self) -> int:
        return self.inputs.shape[0] // 2

    def arrays(self) -> tuple[mx.array, ...]:
        return (self.inputs, self.targets, self.mask, self.reference_chosen, self.reference_rejected)


def pack(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int,
         pad_multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows prompt+response, right-padded; the mask marks targets that are response tokens.

    For a row with prompt length P and response length R, the input position t
    predicts token t+1, so the mask is 1 for t in [P-1, P+R-2].
    """
    lengths = [len(p) + len(r) - 1 for p, r in zip(prompts, responses)]
    width = -(-max(lengths) // pad_multiple) * pad_multiple
    inputs = np.full((len(lengths), width), pad_id, dtype=np.int32)
    targets = np.full((len(lengths), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(lengths), width), dtype=np.float32)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        inputs[row, : len(seq) - 1] = seq[:-1]
        targets[row, : len(seq) - 1] = seq[1:]
        mask[row, len(p) - 1 : len(seq) - 1] = 1.0
    return inputs, targets, mask


def pack_pairs(pairs, pad_id: int, pad_multiple: int = PAD_MULTIPLE) -> Batch:
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    inputs, targets, mask = pack(prompts, responses, pad_id, pad_multiple)
    ref = [p.reference_logps or {"chosen": 0.0, "rejected": 0.0} for p in pairs]
    n_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    return Batch(mx.array(inputs), mx.array(targets), mx.array(mask),
                 mx.array([r["chosen"] for r in ref], dtype=mx.float32),
                 mx.array([r["rejected"] for r in ref], dtype=mx.float32), n_tokens)


def logits_and_logps(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """The logits (N, T, V), and the sum over masked positions of log p(target | inputs so far) (N,)."""
    logits = model(inputs).astype(mx.float32)  # (N, T, V)
    token_logps = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (N, T)
    token_logps = token_logps - mx.logsumexp(logits, axis=-1)  # (N, T)
    return logits, (token_logps * mask).sum(axis=-1)  # (N,)


def sequence_logps(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Sum over masked positions of log p(target | inputs so far): (N, T) -> (N,)."""
    return logits_and_logps(model, inputs, targets, mask)[1]


def pair_logps(model, batch: Batch) -> tuple[mx.array, mx.array]:
    """(chosen, rejected) summed log-probs, each (B,), from one forward of 2B rows."""
    logps = sequence_logps(model, batch.inputs, batch.targets, batch.mask)  # (2B,)
    n = batch.n_pairs
    return logps[:n], logps[n:]


def score_pairs(model, pairs, pad_id: int, batch_size: int,
                on_batch: Callable[[int], None] | None = None) -> list[tuple[float, float]]:
    """Log-probs of every pair's chosen and rejected response; one mx.eval per batch.

    Pairs are sorted by length so that batches hold rows of similar width.
    """
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + max(
        len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)))
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chosen, rejected = pair_logps(model, pack_pairs([pairs[i] for i in idx], pad_id))
        mx.eval(chosen, rejected)  # one evaluation for the whole batch; a sync point
        for i, c, r in zip(idx, chosen.tolist(), rejected.tolist()):
            out[i] = (c, r)
        if on_batch is not None:
            on_batch(len(idx))
    return out
