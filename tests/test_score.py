"""Scoring: masks written out token by token, batched == one-by-one, reference logps stored."""

import mlx.core as mx
import numpy as np
import pytest

from mipo_mlx.score import pack, pack_pairs, pair_logps, score_pairs, sequence_logps

from .builders import random_pairs


def test_mask_row_by_row():
    """Prompt [5, 6, 7] + response [8, 9]: inputs t predict t+1; the response targets are at t = 2, 3.

    Second row: prompt [4] + response [3, 2, 1]: targets 3, 2, 1 at t = 0, 1, 2. Pad id 0.
    """
    inputs, targets, mask = pack([[5, 6, 7], [4]], [[8, 9], [3, 2, 1]], pad_id=0, pad_multiple=8)
    assert inputs.tolist() == [[5, 6, 7, 8, 0, 0, 0, 0],
                               [4, 3, 2, 0, 0, 0, 0, 0]]
    assert targets.tolist() == [[6, 7, 8, 9, 0, 0, 0, 0],
                                [3, 2, 1, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0, 0]]


def test_width_rounds_up_to_pad_multiple():
    inputs, _, _ = pack([[1] * 30], [[2] * 5], pad_id=0, pad_multiple=32)
    assert inputs.shape == (1, 64)  # 34 positions -> 64


def test_pack_pairs_puts_chosen_rows_first_and_counts_tokens():
    pairs = random_pairs(3)
    batch = pack_pairs(pairs, pad_id=0)
    rows = np.array(batch.inputs)
    for i, p in enumerate(pairs):
        assert rows[i, : len(p.prompt_ids)].tolist() == p.prompt_ids
        assert rows[i, len(p.prompt_ids) : len(p.prompt_ids) + len(p.chosen_ids) - 1].tolist() == p.chosen_ids[:-1]
        assert rows[3 + i, len(p.prompt_ids) : len(p.prompt_ids) + len(p.rejected_ids) - 1].tolist() == p.rejected_ids[:-1]
    assert batch.n_tokens == sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert batch.n_pairs == 3


def one_by_one(model, prompt, response):
    """log p(response | prompt) from an unpadded forward, summed by hand."""
    seq = mx.array([prompt + response])
    logits = model(seq[:, :-1]).astype(mx.float32)[0]  # (T-1, V)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    total = 0.0
    for t in range(len(prompt) - 1, len(prompt) + len(response) - 1):
        total += logp[t, (prompt + response)[t + 1]].item()
    return total


def test_batched_scoring_equals_one_by_one(toy_model):
    model, _ = toy_model
    pairs = random_pairs(5, seed=1)
    chosen, rejected = pair_logps(model, pack_pairs(pairs, pad_id=0))
    for i, p in enumerate(pairs):
        assert chosen[i].item() == pytest.approx(one_by_one(model, p.prompt_ids, p.chosen_ids), abs=1e-3)
        assert rejected[i].item() == pytest.approx(one_by_one(model, p.prompt_ids, p.rejected_ids), abs=1e-3)


def test_padding_is_never_scored(toy_model):
    """The same rows padded to different widths give the same log-probs."""
    model, _ = toy_model
    a = sequence_logps(model, *map(mx.array, pack([[5, 6, 7]], [[8, 9, 10]], 0, pad_multiple=8)))
    b = sequence_logps(model, *map(mx.array, pack([[5, 6, 7]], [[8, 9, 10]], 0, pad_multiple=64)))
    assert a.item() == pytest.approx(b.item(), abs=1e-4)


def test_score_pairs_restores_order(toy_model):
    model, _ = toy_model
    pairs = random_pairs(7, seed=2)
    scores = score_pairs(model, pairs, pad_id=0, batch_size=3)
    for p, (c, r) in zip(pairs, scores):
        assert c == pytest.approx(one_by_one(model, p.prompt_ids, p.chosen_ids), abs=1e-3)
        assert r == pytest.approx(one_by_one(model, p.prompt_ids, p.rejected_ids), abs=1e-3)
