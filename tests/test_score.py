"""Scoring: masks written out token by token, batched == one-by-one, reference logps stored."""

import mlx.core as mx
import numpy as np
import pytest

from mipo_mlx.engine.batching import pack, pack_pairs
from mipo_mlx.engine.logps import pair_logps, sequence_logps
from mipo_mlx.engine.scoring import score_pairs

from .builders import lora_model, made_up_pairs


def test_mask_row_by_row():
    """Prompt [5, 6, 7] + response [8, 9]: inputs t predict t+1; the response targets are at
    t = 2, 3.

    Second row: prompt [4] + response [3, 2, 1]: targets 3, 2, 1 at t = 0, 1, 2. Pad id 0.
    """
    inputs, targets, mask = pack([[5, 6, 7], [4]], [[8, 9], [3, 2, 1]], pad_id=0, pad_multiple=8)
    assert inputs.tolist() == [[5, 6, 7, 8, 0, 0, 0, 0], [4, 3, 2, 0, 0, 0, 0, 0]]
    assert targets.tolist() == [[6, 7, 8, 9, 0, 0, 0, 0], [3, 2, 1, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]


def test_width_rounds_up_to_pad_multiple():
    inputs, _, _ = pack([[1] * 30], [[2] * 5], pad_id=0, pad_multiple=32)
    assert inputs.shape == (1, 64)  # 34 positions -> 64


def test_pack_pairs_puts_chosen_rows_first_and_counts_tokens():
    pairs = made_up_pairs(3)
    batch = pack_pairs(pairs, pad_id=0)
    rows = np.array(batch.inputs)
    for i, p in enumerate(pairs):
        assert rows[i, : len(p.prompt_ids)].tolist() == p.prompt_ids
        assert (
            rows[i, len(p.prompt_ids) : len(p.prompt_ids) + len(p.chosen_ids) - 1].tolist()
            == p.chosen_ids[:-1]
        )
        assert (
            rows[3 + i, len(p.prompt_ids) : len(p.prompt_ids) + len(p.rejected_ids) - 1].tolist()
            == p.rejected_ids[:-1]
        )
    assert batch.n_tokens == sum(
        2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
    )
    assert batch.n_pairs == 3


class ScalesLogits:
    """`model` with its logits halved in `__call__`: blocks + head alone give other log-probs."""

    def __init__(self, model):
        self.inner, self.layers, self.args, self.model = (
            model,
            model.layers,
            model.args,
            model.model,
        )

    def __call__(self, inputs, cache=None):
        return 0.5 * self.inner(inputs)


class RejectsCaches:
    """`model` whose blocks raise when given a cache (its logits are the model's own)."""

    def __init__(self, model):
        self.inner, self.layers, self.args = model, model.layers, model.args

        def body(inputs, cache=None):
            if cache is not None:
                raise TypeError("no cache here")
            return model.model(inputs)

        body.embed_tokens = model.model.embed_tokens  # the tied LM head
        self.model = body
        if hasattr(model, "lm_head"):
            self.lm_head = model.lm_head

    def __call__(self, inputs, cache=None):
        return self.inner(inputs)


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
    pairs = made_up_pairs(5, seed=1)
    chosen, rejected = pair_logps(model, pack_pairs(pairs, pad_id=0).tree())
    for i, p in enumerate(pairs):
        assert chosen[i].item() == pytest.approx(
            one_by_one(model, p.prompt_ids, p.chosen_ids), abs=1e-3
        )
        assert rejected[i].item() == pytest.approx(
            one_by_one(model, p.prompt_ids, p.rejected_ids), abs=1e-3
        )


def test_padding_is_never_scored(toy_model):
    """The same rows padded to different widths give the same log-probs."""
    model, _ = toy_model
    a = sequence_logps(model, *map(mx.array, pack([[5, 6, 7]], [[8, 9, 10]], 0, pad_multiple=8)))
    b = sequence_logps(model, *map(mx.array, pack([[5, 6, 7]], [[8, 9, 10]], 0, pad_multiple=64)))
    assert a.item() == pytest.approx(b.item(), abs=1e-4)


def test_score_pairs_restores_order(toy_model):
    model, _ = toy_model
    pairs = made_up_pairs(7, seed=2)
    scores = score_pairs(model, pairs, pad_id=0, batch_size=3)
    for p, (c, r) in zip(pairs, scores):
        assert c == pytest.approx(one_by_one(model, p.prompt_ids, p.chosen_ids), abs=1e-3)
        assert r == pytest.approx(one_by_one(model, p.prompt_ids, p.rejected_ids), abs=1e-3)


# ---------------------------------------------------------------- shared prompt prefix


def test_shared_layout_row_by_row():
    """Prompt [5, 6, 7], chosen [8, 9], rejected [4]: the prefix holds [5, 6] once; the rows
    start at the last prompt token 7, which predicts the first response token."""
    from mipo_mlx.data.pair_file import Pair

    pair = Pair(
        messages=[],
        chosen="c",
        rejected="r",
        prompt_ids=[5, 6, 7],
        chosen_ids=[8, 9],
        rejected_ids=[4],
        negatives="random",
        source=0,
    )
    batch = pack_pairs([pair], pad_id=0, shared=True, pad_multiple=4)
    assert batch.shared
    assert batch.prefix.tolist() == [[5, 6, 0, 0]]
    assert batch.prefix_lengths.tolist() == [2]
    assert batch.inputs.tolist() == [[7, 8, 0, 0], [7, 0, 0, 0]]
    # scored: row 0 at t = 0, 1 (targets 8, 9), row 1 at t = 0 (target 4), then a dummy
    assert batch.positions.tolist() == [0, 1, 4, 0]
    assert batch.targets.tolist() == [8, 9, 4, 0]
    assert batch.owners.tolist() == [[1, 0], [1, 0], [0, 1], [0, 0]]
    assert batch.n_tokens == 2 + 3 + 2  # prefix once, then 7+8+9 and 7+4
    plain = pack_pairs([pair], pad_id=0, shared=False, pad_multiple=4)
    assert not plain.shared and plain.n_tokens == 2 * 3 + 2 + 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_prefix_equals_unshared_in_logps_and_gradients(toy_model_dir, seed):
    """Prompts of different lengths (1 to 13 tokens), responses of different lengths: each
    prompt runs once and its keys/values feed both responses, with the gradient flowing
    back through them. Log-probs and every adapter gradient agree to 1e-5."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mipo_mlx.data.pair_file import Pair

    model = lora_model(toy_model_dir)
    pairs = made_up_pairs(6, seed=seed)
    # A one-token prompt: empty prefix
    pairs.append(
        Pair(
            messages=[],
            chosen="c",
            rejected="r",
            prompt_ids=[9],
            chosen_ids=[10, 11, 12],
            rejected_ids=[13],
            negatives="random",
            source=6,
        )
    )

    def objective(model, shared):
        chosen, rejected = pair_logps(model, pack_pairs(pairs, 0, shared=shared).tree())
        return (chosen - 0.7 * rejected).sum(), (chosen, rejected)

    (value_s, logps_s), grads_s = nn.value_and_grad(model, lambda m: objective(m, True))(model)
    (value_u, logps_u), grads_u = nn.value_and_grad(model, lambda m: objective(m, False))(model)
    for s, u in zip(logps_s, logps_u):
        assert np.allclose(np.array(s), np.array(u), rtol=1e-5, atol=1e-5)
    flat_s, flat_u = dict(tree_flatten(grads_s)), dict(tree_flatten(grads_u))
    assert flat_s.keys() == flat_u.keys() and len(flat_s) > 0
    scale = max(np.abs(np.array(g)).max() for g in flat_u.values())
    assert scale > 0
    for name in flat_s:
        gap = np.abs(np.array(flat_s[name]) - np.array(flat_u[name])).max()
        assert gap <= 1e-5 * scale, (name, gap, scale)


def test_shared_reference_scores_equal_unshared(toy_model):
    model, _ = toy_model
    pairs = made_up_pairs(9, seed=4)
    shared = score_pairs(model, pairs, pad_id=0, batch_size=4, shared=True)
    plain = score_pairs(model, pairs, pad_id=0, batch_size=4, shared=False)
    assert np.allclose(np.array(shared), np.array(plain), rtol=1e-5, atol=1e-5)


def test_sharing_check_refuses_models_it_does_not_fit(toy_model):
    """The fast path calls the model's blocks and LM head itself. A model that does more
    than that (here: scales its logits, as some architectures do) gives other log-probs
    that way; one whose blocks reject the caches raises. The check says no to both, and
    the pipeline falls back to the plain packing."""
    from mipo_mlx.engine.probes import sharing_works

    model, _ = toy_model
    pairs = made_up_pairs(2, seed=5)
    assert sharing_works(model, pairs, 0)
    assert not sharing_works(ScalesLogits(model), pairs, 0)
    assert not sharing_works(RejectsCaches(model), pairs, 0)


def test_a_fallback_says_why_once(toy_model, capsys):
    """A fast path that is not taken says why, in one line, once per process: a bug there must
    not hide as slowness."""
    from mipo_mlx.engine import probes

    model, _ = toy_model
    pairs = made_up_pairs(2, seed=5)
    probes._said.clear()
    assert not probes.sharing_works(ScalesLogits(model), pairs, 0)
    assert not probes.sharing_works(ScalesLogits(model), pairs, 0)
    assert not probes.sharing_works(RejectsCaches(model), pairs, 0)
    assert probes.sharing_works(model, pairs, 0)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("note: this model's attention does not take a shared prompt prefix")
    assert "log-probs differ by" in lines[0] and lines[0].endswith("; using the slower path")
    assert "(TypeError: no cache here)" in lines[1]


def test_response_logps_equal_one_by_one_both_ways(toy_model):
    """Evaluation's scorer: the head on response positions only (this model) and full logits
    (a model that scales its logits) both give each row's own log-prob, whatever the batching."""
    from mipo_mlx.engine.probes import head_only_works
    from mipo_mlx.engine.scoring import response_logps

    model, _ = toy_model
    rng = np.random.default_rng(7)
    prompts = [rng.integers(4, 300, size=n).tolist() for n in (3, 40, 1, 17, 64, 9)]
    answers = [rng.integers(4, 300, size=n).tolist() for n in (5, 2, 30, 1, 12, 7)]
    expected = [one_by_one(model, p, a) for p, a in zip(prompts, answers)]

    assert head_only_works(model) and not head_only_works(ScalesLogits(model))
    for budget in (64, 100_000):  # one row per batch up to all rows in one
        got = response_logps(model, prompts, answers, pad_id=0, token_budget=budget)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    scaled = [one_by_one(ScalesLogits(model), p, a) for p, a in zip(prompts, answers)]
    assert not np.allclose(scaled, expected, atol=1e-2)
    np.testing.assert_allclose(
        response_logps(ScalesLogits(model), prompts, answers, pad_id=0),
        scaled,
        rtol=1e-4,
        atol=1e-4,
    )


def test_grouped_logps_run_each_prompt_once_for_its_answers(toy_model):
    """PMI's scorer: each prompt is the prefix of its G answers; every (column, prompt) cell is
    that answer's own log-prob under that prompt, whatever the batching, and a batch holds
    whole prompts (G rows each)."""
    from mipo_mlx.engine.scoring import grouped_logps

    model, _ = toy_model
    rng = np.random.default_rng(11)
    prompts = [rng.integers(4, 300, size=n).tolist() for n in (3, 40, 1, 17, 64, 9)]
    columns = [
        [rng.integers(4, 300, size=int(rng.integers(1, 30))).tolist() for _ in prompts]
        for _ in range(3)
    ]
    expected = [[one_by_one(model, p, a) for p, a in zip(prompts, column)] for column in columns]
    for budget in (64, 100_000):  # one prompt per batch up to all in one
        sizes = []
        got = grouped_logps(model, prompts, columns, 0, token_budget=budget, on_batch=sizes.append)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        assert sum(sizes) == 18 and all(n % 3 == 0 for n in sizes)
        assert len(sizes) == (6 if budget == 64 else 1)


def test_response_logps_reusing_a_common_prefix(toy_model):
    """Few-shot-shaped rows (70 shared tokens, then their own question): the shared prefix runs
    once and every row's log-prob is still its own; a model whose blocks reject caches falls
    back."""
    from mipo_mlx.engine.prefix import common_prefix
    from mipo_mlx.engine.probes import prefix_reuse_works
    from mipo_mlx.engine.scoring import response_logps

    model, _ = toy_model
    rng = np.random.default_rng(11)
    shots = rng.integers(4, 300, size=70).tolist()
    prompts = [shots + rng.integers(4, 300, size=n).tolist() for n in (1, 9, 4, 23)]
    answers = [rng.integers(4, 300, size=n).tolist() for n in (6, 1, 15, 3)]
    assert (
        common_prefix(prompts) >= 70
        and common_prefix([[1, 2], [1, 2, 3]]) == 1
        and common_prefix([]) == 0
    )
    assert prefix_reuse_works(model)
    expected = [one_by_one(model, p, a) for p, a in zip(prompts, answers)]
    for budget in (64, 100_000):
        got = response_logps(model, prompts, answers, pad_id=0, token_budget=budget)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The shared prefix not reused
    np.testing.assert_allclose(
        response_logps(model, prompts, answers, pad_id=0, min_shared=10_000),
        expected,
        rtol=1e-4,
        atol=1e-4,
    )

    rejecting = RejectsCaches(model)
    assert not prefix_reuse_works(rejecting)
    np.testing.assert_allclose(
        response_logps(rejecting, prompts, answers, pad_id=0), expected, rtol=1e-4, atol=1e-4
    )


def test_prefix_pass_mask_is_mlx_lms_causal_mask():
    """The prefix pass builds its causal mask itself (mlx_lm is imported only when a model
    loads, so bad input fails fast); it must equal mlx-lm's."""
    from mlx_lm.models.base import create_causal_mask

    from mipo_mlx.engine.prefix import RecordKV

    for n in (1, 2, 9):
        assert RecordKV().make_mask(n) == "causal"
        assert mx.array_equal(
            RecordKV().make_mask(n, return_array=True), create_causal_mask(n)
        ).item()


def test_response_logps_batches_hold_the_logits_budget(toy_model):
    """A scoring batch holds at most logits_budget logits (scored positions x vocabulary): the
    logits, not the tokens, set its peak memory (PMI scores 5 rows per answer). The log-probs
    do not depend on it, and a row longer than the budget still gets a batch of its own."""
    from mipo_mlx.engine.scoring import response_logps

    model, _ = toy_model
    vocab = model.args.vocab_size
    rng = np.random.default_rng(3)
    prompts = [rng.integers(4, 300, size=n).tolist() for n in (3, 40, 1, 17, 64, 9, 5, 2)]
    answers = [rng.integers(4, 300, size=n).tolist() for n in (5, 2, 30, 1, 12, 7, 9, 4)]
    expected = [one_by_one(model, p, a) for p, a in zip(prompts, answers)]
    for model_, name in ((model, "head only"), (ScalesLogits(model), "full logits")):
        unbounded, bounded = [], []
        got = response_logps(model_, prompts, answers, 0, on_batch=unbounded.append)
        small = response_logps(
            model_, prompts, answers, 0, on_batch=bounded.append, logits_budget=16 * vocab
        )
        np.testing.assert_allclose(small, got, rtol=1e-4, atol=1e-4)
        if name == "head only":
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        assert unbounded == [len(prompts)], name  # all in one batch by default
        # 16 positions a batch: the 30-token answer alone, the others in batches of <= 16
        assert len(bounded) >= 5 and sum(bounded) == len(prompts), (name, bounded)
