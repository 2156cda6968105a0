"""Epoch order and the batch stream of training.

Batch k of the stream is a pure function of (pairs, seed, k): resuming skips the
first batches without packing them, and every rank draws the same global batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..core.config import TrainingConfig
from ..data.pair_file import Pair


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


PAD_MULTIPLE = 32  # fewer distinct shapes -> fewer recompiles of the compiled step


@dataclass
class Rows:
    """N token rows packed for one forward, and the K positions that are scored.

    With a prefix (width > 0), each prefix row runs once through the blocks and the
    rows continue from its keys and values: row r continues prefix r % P, at RoPE
    offset prefix_lengths[r % P]. Only the scored positions (response tokens; K rounded
    up with dummies of weight 0) go through the log-softmax, and, where the model allows,
    through the LM head."""

    prefix: mx.array  # (P, W) token ids, right-padded; (N, 0) for no prefix
    prefix_lengths: mx.array  # (P,) real tokens in each prefix row
    inputs: mx.array  # (N, T) token ids fed to the model
    positions: mx.array  # (K,) flat indices row * T + t of the scored positions
    targets: mx.array  # (K,) the token each scored position predicts
    owners: mx.array  # (K, N) 1.0 where position k belongs to row r (0 for the dummies)

    def tree(self) -> dict[str, mx.array]:
        """The arrays by name: what goes through `mx.compile` and the loss."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), mx.array)
        }


@dataclass
class Batch(Rows):
    """B pairs packed as 2B rows, chosen rows first, then rejected rows, with their stored
    reference log-probs. With a shared prompt the B prefix rows are the prompts but
    their last token, and the rows hold that last token and the response; without,
    the rows hold prompt and response whole. Both give the same log-probs."""

    reference_chosen: mx.array  # (B,) stored reference log-probs
    reference_rejected: mx.array  # (B,)
    n_tokens: int  # real (non-padding) tokens through the model, for throughput

    @property
    def n_pairs(self) -> int:
        return self.inputs.shape[0] // 2

    @property
    def shared(self) -> bool:
        return self.prefix.shape[1] > 0


def _width(longest: int, pad_multiple: int) -> int:
    return -(-max(longest, 1) // pad_multiple) * pad_multiple


def pack(
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    pad_multiple: int = PAD_MULTIPLE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    """(positions, targets, owners) of the masked entries of (N, T) arrays; see Rows."""
    rows, cols = np.nonzero(mask)
    k = _width(len(rows), pad_multiple)
    positions = np.zeros(k, dtype=np.int32)
    picked = np.zeros(k, dtype=np.int32)
    owners = np.zeros((k, mask.shape[0]), dtype=np.float32)
    positions[: len(rows)] = rows * mask.shape[1] + cols
    picked[: len(rows)] = targets[rows, cols]
    owners[np.arange(len(rows)), rows] = 1.0
    return mx.array(positions), mx.array(picked), mx.array(owners)


def pack_rows(
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    pad_multiple: int = PAD_MULTIPLE,
) -> Rows:
    """Rows prompt+response with no prefix; the response tokens are scored."""
    inputs, targets, mask = pack(prompts, responses, pad_id, pad_multiple)
    n = len(prompts)
    return Rows(
        mx.zeros((n, 0), mx.int32),
        mx.zeros((n,), mx.int32),
        mx.array(inputs),
        *scored_positions(targets, mask, pad_multiple),
    )


def pack_grouped(
    prompts: Sequence[list[int]],
    columns: Sequence[Sequence[list[int]]],
    pad_id: int,
    pad_multiple: int = PAD_MULTIPLE,
) -> Rows:
    """P prompts, each run once as the prefix of G rows: row c * P + i continues prompt i
    with `columns[c][i]`. The prefix rows are the prompts but their last token; each row
    holds that last token (whose output predicts the first response token) and the
    response, which is scored. The same log-probs as each prompt + response whole."""
    heads = [p[:-1] for p in prompts]
    prefix = np.full((len(prompts), _width(max(map(len, heads)), pad_multiple)), pad_id, np.int32)
    for row, head in enumerate(heads):
        prefix[row, : len(head)] = head
    responses = [r for column in columns for r in column]
    rows = pack_rows([p[-1:] for p in prompts] * len(columns), responses, pad_id, pad_multiple)
    rows.prefix = mx.array(prefix)
    rows.prefix_lengths = mx.array([len(h) for h in heads], dtype=mx.int32)
    return rows


def pack_pairs(pairs, pad_id: int, shared: bool = False, pad_multiple: int = PAD_MULTIPLE) -> Batch:
    """Pack pairs for one forward; `shared` runs each prompt once for both responses. A pair
    not yet scored gets a NaN reference: a loss on it is never reference-free DPO."""
    unscored = {"chosen": float("nan"), "rejected": float("nan")}
    ref = [p.reference_logps or unscored for p in pairs]
    reference = {
        "reference_chosen": mx.array([r["chosen"] for r in ref], dtype=mx.float32),
        "reference_rejected": mx.array([r["rejected"] for r in ref], dtype=mx.float32),
    }
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    if not shared:
        prompts = [p.prompt_ids for p in pairs] * 2
        rows = pack_rows(prompts, responses, pad_id, pad_multiple)
        rows.prefix, rows.prefix_lengths = (
            mx.zeros((len(pairs), 0), mx.int32),
            mx.zeros((len(pairs),), mx.int32),
        )
        n_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
        return Batch(**rows.tree(), **reference, n_tokens=n_tokens)
    rows = pack_grouped(
        [p.prompt_ids for p in pairs],
        [responses[: len(pairs)], responses[len(pairs) :]],
        pad_id,
        pad_multiple,
    )
    n_tokens = sum(len(p.prompt_ids) - 1 for p in pairs) + sum(len(r) + 1 for r in responses)
    return Batch(**rows.tree(), **reference, n_tokens=n_tokens)
