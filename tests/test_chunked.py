"""The CPU's cheaper forms of the same numbers: passes through the blocks in chunks of tokens
(`prefix.chunked`) and the log-softmax with `exp` as a power of 2 (`logps._cpu_token_logps`)
give the log-probs and gradients of the plain forms."""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from mipo_mlx.engine import prefix
from mipo_mlx.engine.batching import pack_pairs
from mipo_mlx.engine.logps import _cpu_token_logps, pair_logps
from mipo_mlx.engine.scoring import response_logps

from .builders import lora_model, made_up_pairs

_models: dict = {}


def _model(toy_model_dir, checkpointed: bool):
    """`lora_model`, loaded once (with its blocks checkpointed, once more)."""
    if checkpointed not in _models:
        from mipo_mlx.engine.trainer import recompute_blocks

        _models[checkpointed] = lora_model(toy_model_dir)
        if checkpointed:
            recompute_blocks(_models[checkpointed])
    return _models[checkpointed]


@contextmanager
def cpu_chunk(n: int):
    before = prefix.CPU_CHUNK
    prefix.CPU_CHUNK = n
    try:
        yield
    finally:
        prefix.CPU_CHUNK = before


def _logps_and_grads(model, pairs):
    def objective(model):
        chosen, rejected = pair_logps(model, pack_pairs(pairs, 0, shared=True).tree())
        return (chosen - 0.7 * rejected).sum(), (chosen, rejected)

    (_, logps), grads = nn.value_and_grad(model, objective)(model)
    return np.concatenate([np.array(x) for x in logps]), dict(tree_flatten(grads))


@settings(max_examples=12, deadline=None)
@given(
    chunk=st.integers(1, 9),
    seed=st.integers(0, 10_000),
    n_pairs=st.integers(1, 5),
    checkpointed=st.booleans(),
)
def test_chunked_passes_equal_one_pass(toy_model_dir, chunk, seed, n_pairs, checkpointed):
    """Shared-prompt pairs (prompts and responses of different lengths, so rows are padded
    on the right): the prompt pass and the rows in chunks of `chunk` tokens give every
    log-prob and adapter gradient of one pass, with or without gradient checkpointing."""
    model = _model(toy_model_dir, checkpointed)
    pairs = made_up_pairs(n_pairs, seed=seed)
    with cpu_chunk(10**6):
        want_logps, want_grads = _logps_and_grads(model, pairs)
    with cpu_chunk(chunk):
        got_logps, got_grads = _logps_and_grads(model, pairs)
    np.testing.assert_allclose(got_logps, want_logps, rtol=1e-5, atol=1e-4)
    assert got_grads.keys() == want_grads.keys() and got_grads
    scale = max(np.abs(np.array(g)).max() for g in want_grads.values())
    assert scale > 0
    for name, want in want_grads.items():
        gap = np.abs(np.array(got_grads[name]) - np.array(want)).max()
        assert gap <= 1e-5 * scale, (name, gap, scale)


@settings(max_examples=8, deadline=None)
@given(chunk=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_chunked_rows_after_a_common_prefix_equal_one_pass(toy_model_dir, chunk, seed):
    """Evaluation's path: a prefix all prompts share runs once, the rows continue its keys
    and values; in chunks, the same log-probs."""
    model = _model(toy_model_dir, False)
    rng = np.random.default_rng(seed)
    shared = rng.integers(5, 300, 9).tolist()
    prompts = [shared + rng.integers(5, 300, rng.integers(1, 6)).tolist() for _ in range(4)]
    responses = [rng.integers(5, 300, rng.integers(1, 12)).tolist() for _ in range(4)]
    with cpu_chunk(10**6):
        want = response_logps(model, prompts, responses, 0, min_shared=4)
    with cpu_chunk(chunk):
        got = response_logps(model, prompts, responses, 0, min_shared=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_a_later_chunks_mask_is_mlx_lms_causal_mask_at_its_offset():
    from mlx_lm.models.base import create_causal_mask

    from mipo_mlx.engine.prefix import RecordKV

    for done, n in ((0, 3), (4, 1), (5, 6)):
        record = RecordKV()
        if done:
            record.update_and_fetch(mx.zeros((1, 1, done, 2)), mx.zeros((1, 1, done, 2)))
            record.next_chunk()
        assert record.offset == done
        assert mx.array_equal(
            record.make_mask(n, return_array=True), create_causal_mask(n, offset=done)
        ).item()


def _reference_token_logps(logits, targets):
    return mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(
        logits, axis=-1
    )


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    vocab=st.integers(2, 300),
    spread=st.floats(0.01, 60.0),
    shift=st.floats(-200.0, 200.0),
    seed=st.integers(0, 10_000),
)
def test_cpu_log_softmax_equals_logsumexps(rows, vocab, spread, shift, seed):
    """Log-probs and their gradient from `exp` as a power of 2 equal `mx.logsumexp`'s, for
    logits of any spread and offset (the largest logit sets the scale of both errors)."""
    rng = np.random.default_rng(seed)
    logits = mx.array((shift + spread * rng.standard_normal((rows, vocab))).astype(np.float32))
    targets = mx.array(rng.integers(0, vocab, rows).astype(np.int32))
    cotangent = mx.array(rng.standard_normal(rows).astype(np.float32))
    got, got_grad = mx.vjp(lambda x: _cpu_token_logps(x, targets), [logits], [cotangent])
    want, want_grad = mx.vjp(lambda x: _reference_token_logps(x, targets), [logits], [cotangent])
    size = 1.0 + abs(shift) + spread
    np.testing.assert_allclose(np.array(got[0]), np.array(want[0]), rtol=0, atol=2e-6 * size)
    np.testing.assert_allclose(
        np.array(got_grad[0]), np.array(want_grad[0]), rtol=0, atol=1e-5 * size
    )
    # The probabilities each row's gradient holds sum to one: -sum(grad) + cot = cot
    np.testing.assert_allclose(np.array(got_grad[0].sum(axis=-1)), 0.0, atol=1e-5 * size)
