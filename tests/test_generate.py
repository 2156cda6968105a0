"""Local generation with token ids kept, per-prompt random streams, and the helpers around it."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mipo_mlx.core.config import GenerationConfig, TrainingConfig
from mipo_mlx.data.pair_file import Pair
from mipo_mlx.engine.batching import batch_stream, total_steps
from mipo_mlx.engine.generation import (
    STREAM_STRIDE,
    DecodeLogits,
    Response,
    StreamSampler,
    decode,
    generate,
    inverse_cdf,
    nucleus_floors,
    sample_rows,
    stream_seed,
)

QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Which planet is red?",
    "Please answer in two short sentences. What is 2 + 2?",
    "hello",
    "The quick brown fox jumps over the lazy dog. Why?",
    "Question: which planet is red? Choices: A) Mars B) Venus.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Thanks! Is it yes or no or maybe?",
]


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
    )


@pytest.fixture(scope="module")
def prompt_ids(toy_model):
    _, tokenizer = toy_model
    return [chat_ids(tokenizer, q) for q in QUESTIONS]


def gen_config(**kw) -> GenerationConfig:
    fields = dict(temperature=1.0, top_p=1.0, max_tokens=16, batch_size=8, seed=7)
    fields.update(kw)
    return GenerationConfig(**fields)


@pytest.fixture(scope="module")
def many_responses(toy_model):
    """Long-ish samples from many streams, so that some finish and some do not."""
    model, tokenizer = toy_model
    ids = chat_ids(tokenizer, QUESTIONS[0])
    config = gen_config(max_tokens=64, batch_size=16, seed=1)
    return generate(model, tokenizer, [ids] * 48, config, streams=list(range(48))), config


def test_eos_ids_of_the_toy_tokenizer(toy_model):
    _, tokenizer = toy_model
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_generate_returns_one_response_per_prompt_with_token_ids(toy_model, prompt_ids):
    model, tokenizer = toy_model
    responses = generate(
        model, tokenizer, prompt_ids, gen_config(), streams=list(range(len(prompt_ids)))
    )
    assert len(responses) == len(prompt_ids)
    vocab = model.args.vocab_size
    for r in responses:
        assert isinstance(r, Response)
        assert 1 <= len(r.token_ids) <= 16
        assert all(type(t) is int and 0 <= t < vocab for t in r.token_ids)


def test_generate_empty_list(toy_model):
    model, tokenizer = toy_model
    assert generate(model, tokenizer, [], gen_config(), streams=[]) == []


def test_finished_and_unfinished_responses(many_responses, toy_model):
    _, tokenizer = toy_model
    responses, config = many_responses
    eos = tokenizer.eos_token_ids
    finished = [r for r in responses if r.finished]
    unfinished = [r for r in responses if not r.finished]
    assert len(finished) >= 2 and len(unfinished) >= 2  # the seed gives both kinds
    for r in finished:
        assert r.token_ids[-1] in eos
        assert not any(t in eos for t in r.token_ids[:-1])
        assert len(r.token_ids) <= config.max_tokens
    for r in unfinished:
        assert len(r.token_ids) == config.max_tokens
        assert not any(t in eos for t in r.token_ids)


def test_on_done_reports_every_response_once(toy_model, prompt_ids):
    model, tokenizer = toy_model
    seen = {}
    responses = generate(
        model,
        tokenizer,
        prompt_ids,
        gen_config(batch_size=3),
        streams=list(range(len(prompt_ids))),
        on_done=lambda i, r: seen.setdefault(i, r),
    )
    assert sorted(seen) == list(range(len(prompt_ids)))
    assert all(seen[i] is responses[i] for i in seen)


def test_same_seed_and_streams_are_reproducible(toy_model, prompt_ids):
    model, tokenizer = toy_model
    streams = [10 + i for i in range(len(prompt_ids))]
    a = generate(model, tokenizer, prompt_ids, gen_config(), streams=streams)
    b = generate(model, tokenizer, prompt_ids, gen_config(), streams=streams)
    assert a == b
    c = generate(model, tokenizer, prompt_ids, gen_config(seed=8), streams=streams)
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_response_independent_of_batch_composition(toy_model, prompt_ids, top_p):
    model, tokenizer = toy_model
    n = len(prompt_ids)
    streams = {i: 100 + 3 * i for i in range(n)}

    def run(order, batch_size):
        config = gen_config(top_p=top_p, max_tokens=24, batch_size=batch_size)
        out = generate(
            model,
            tokenizer,
            [prompt_ids[i] for i in order],
            config,
            streams=[streams[i] for i in order],
        )
        return dict(zip(order, out))

    reference = run(list(range(n)), 16)
    for order, batch_size in [
        (list(reversed(range(n))), 3),
        ([5, 2, 7, 0], 1),
        ([3, 1, 6], 2),
        ([4, 0, 6, 1, 2, 5, 3, 7], 4),
    ]:
        got = run(order, batch_size)
        for i in order:
            assert got[i] == reference[i], (
                f"prompt {i} changed with order {order}, batch {batch_size}"
            )


def test_different_streams_give_different_samples(toy_model, prompt_ids):
    model, tokenizer = toy_model
    out = generate(model, tokenizer, [prompt_ids[0]] * 6, gen_config(), streams=list(range(6)))
    assert len({tuple(r.token_ids) for r in out}) == 6


def test_stream_seed_separates_passes_and_runs():
    """Stream seeds are distinct within a run (both passes) and across neighbouring run seeds:
    a run's negatives never reuse another seed's positive streams."""
    seeds = {
        stream_seed(run, s)
        for run in (41, 42, 43)
        for s in (*range(500), *range(STREAM_STRIDE, STREAM_STRIDE + 500))
    }
    assert len(seeds) == 3 * 1000
    assert stream_seed(42, STREAM_STRIDE) != stream_seed(43, 0)
    assert stream_seed(42, 3) == stream_seed(42, 3)
    assert all(0 <= s < 2**63 for s in seeds)


def test_temperature_zero_is_greedy(toy_model, prompt_ids):
    model, tokenizer = toy_model
    config = gen_config(temperature=0.0, max_tokens=4)
    out = generate(model, tokenizer, prompt_ids, config, streams=list(range(len(prompt_ids))))
    for ids, r in zip(prompt_ids, out):
        logits = model(mx.array([ids]))[0, -1]
        assert r.token_ids[0] == int(mx.argmax(logits).item())
        # the whole greedy sequence, recomputed without a cache
        seq = list(ids)
        for t in r.token_ids:
            nxt = int(mx.argmax(model(mx.array([seq]))[0, -1]).item())
            assert t == nxt
            seq.append(nxt)
    # greedy ignores the streams and the seed
    again = generate(
        model,
        tokenizer,
        prompt_ids,
        gen_config(temperature=0.0, max_tokens=4, seed=99),
        streams=[50 + i for i in range(len(prompt_ids))],
    )
    assert again == out


def draw(logprobs, uniforms, temperature=1.0, top_p=1.0):
    logprobs = np.asarray(logprobs, dtype=np.float32)
    return sample_rows(logprobs, np.asarray(uniforms), temperature, top_p).tolist()


def test_sample_rows_inverse_cdf_by_hand():
    """Probabilities 0.1 0.2 0.3 0.4: the cumulative mass in vocabulary order is 0.1 0.3 0.6
    1.0, so u in [0, 0.1) picks token 0, [0.1, 0.3) token 1, and so on."""
    row = np.log([0.1, 0.2, 0.3, 0.4])
    assert draw([row] * 4, [0.05, 0.25, 0.59, 0.99]) == [0, 1, 2, 3]


def test_sample_rows_nucleus_by_hand():
    """top_p 0.65: most probable first 0.4 0.3 | 0.2 0.1; the mass before 0.3 is 0.4 < 0.65,
    before 0.2 it is 0.7, so the nucleus is {3, 2}. In vocabulary order its weights are 0.3
    then 0.4 of 0.7: u < 3/7 picks 2, the rest 3."""
    row = np.log([0.1, 0.2, 0.3, 0.4])
    assert draw([row] * 4, [0.0, 0.42, 0.43, 0.9999], top_p=0.65) == [2, 2, 3, 3]
    assert draw([row] * 2, [0.0, 0.9999], top_p=0.35) == [3, 3]  # the nucleus is {3}
    # temperature 0.5 squares the weights: 0.09 and 0.16 of 0.25, so u < 0.36 picks 2
    assert draw([row] * 2, [0.35, 0.37], temperature=0.5, top_p=0.65) == [2, 3]
    assert draw([row], [0.9], temperature=0.0, top_p=0.65) == [3]  # greedy


def test_sample_rows_each_row_alone():
    """A row's token depends on its own log-probs and uniform only, whatever the other rows
    are: peaked rows and a flat one (a nucleus of most of the vocabulary) together."""
    rng = np.random.default_rng(0)
    peaked = rng.normal(size=(6, 2048)) * 4
    flat = rng.normal(size=(1, 2048)) * 0.01  # its nucleus holds far more than 256 tokens
    rows = np.concatenate([peaked, flat])
    rows = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
    u = rng.random(7)
    together = draw(rows, u, temperature=0.7, top_p=0.9)
    alone = [draw(rows[i : i + 1], u[i : i + 1], temperature=0.7, top_p=0.9)[0] for i in range(7)]
    assert together == alone
    assert draw(rows[:6], u[:6], 0.7, 0.9) == together[:6]


def test_sample_rows_frequencies_match_the_nucleus():
    """Over many uniforms each kept token comes up in proportion to its weight."""
    row = np.log([0.05, 0.15, 0.3, 0.5])
    u = (np.arange(10_000) + 0.5) / 10_000
    picks = np.array(draw([row] * len(u), u, top_p=0.7))
    # nucleus {3, 2}: weights 0.5 and 0.3 of 0.8
    assert set(picks.tolist()) == {2, 3}
    assert abs((picks == 3).mean() - 0.625) < 1e-3


class Step:
    """Stands in for mlx-lm's GenerationBatch: the sampler reads `uids` from its caller."""

    uids = [0, 1]

    def sample(self, sampler, stand_in):
        return sampler(stand_in)


def test_the_sampler_reads_each_decode_step_s_own_logits_once(toy_model):
    """BatchGenerator gets a one-value stand-in from a decode step and the sampler the real
    logits (greedy: their argmax); prompt processing passes through; a sampler called again
    without a new step (a changed mlx-lm) stops with one line."""
    model, _ = toy_model
    source = DecodeLogits(model)
    prefill = source(mx.array([[1, 2, 3]]))
    assert prefill.shape == model(mx.array([[1, 2, 3]])).shape and source.logits is None
    inputs = mx.array([[5], [7]])
    stand_in = source(inputs)
    assert stand_in.shape == (2, 1, 1)
    sampler = StreamSampler(0.0, 1.0, source)
    picked = Step().sample(sampler, stand_in[:, -1, :])
    assert picked.tolist() == mx.argmax(model(inputs)[:, -1, :], axis=-1).tolist()
    with pytest.raises(RuntimeError, match="needs updating for this mlx-lm version"):
        Step().sample(sampler, stand_in[:, -1, :])


def reference_floor(row: np.ndarray, top_p: float) -> tuple[float, np.ndarray]:
    """The nucleus by its definition, with a whole sort and float64 sums: the least kept
    probability, and the mass before each token most probable first."""
    ordered = np.sort(row.astype(np.float64))[::-1]
    before = np.cumsum(ordered) - ordered
    return ordered[(before < top_p).sum() - 1], before


def vocab_rows():
    """Rows of float32 probabilities: peaked, flat (most of the vocabulary in the nucleus),
    with ties (logits on a coarse grid) and with underflow to 0."""
    shape = st.tuples(st.integers(1, 4), st.integers(1, 3000))
    return st.builds(
        lambda size, scale, grid, seed: (size, scale, grid, seed),
        shape,
        st.sampled_from([0.001, 0.3, 1.0, 4.0, 40.0]),
        st.sampled_from([0.0, 0.5, 2.0]),
        st.integers(0, 2**32 - 1),
    )


def make_rows(spec) -> np.ndarray:
    (rows, vocab), scale, grid, seed = spec
    logits = np.random.default_rng(seed).normal(size=(rows, vocab)) * scale
    if grid:
        logits = np.round(logits / grid) * grid
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.exp(logprobs.astype(np.float32))


@settings(max_examples=300, deadline=None)
@given(vocab_rows(), st.floats(0.01, 0.999))
def test_nucleus_floors_match_the_whole_sort(spec, top_p):
    """The bucketed nucleus gives the floor a whole sort gives, for peaked, flat and tied rows
    (a top_p within rounding of a token's mass-before is left out: either side is right)."""
    probs = make_rows(spec)
    floors = nucleus_floors(probs, top_p)
    for r, row in enumerate(probs):
        floor, before = reference_floor(row, top_p)
        assume(np.abs(before - top_p).min() > 1e-6)
        assert floors[r, 0] == floor


@settings(max_examples=300, deadline=None)
@given(vocab_rows(), st.floats(0.0, 0.999999), st.floats(0.0, 0.9))
def test_inverse_cdf_matches_the_whole_cumulative_sum(spec, u, zeroed):
    """In two levels, the token a whole float64 cumulative sum picks; never one of weight 0."""
    weights = make_rows(spec)
    weights[weights < np.quantile(weights, zeroed, axis=-1, keepdims=True)] = 0.0
    uniforms = np.full(len(weights), u)
    picked = inverse_cdf(weights, uniforms)
    for r, row in enumerate(weights.astype(np.float64)):
        cumulative = np.cumsum(row)
        target = u * cumulative[-1]
        assert row[picked[r]] > 0
        assume(np.abs(cumulative - target).min() > 1e-9 * cumulative[-1])
        assert picked[r] == (cumulative <= target).sum()


# ---------------------------------------------------------------- decode


def test_decode_drops_eos_only_when_finished(toy_model):
    _, tokenizer = toy_model
    eos = next(iter(tokenizer.eos_token_ids))
    body = tokenizer.encode("The answer is 7.", add_special_tokens=False)
    assert decode(tokenizer, Response(body + [eos], True)) == "The answer is 7."
    assert decode(tokenizer, Response(body, False)) == "The answer is 7."
    assert decode(tokenizer, Response(body[:-1], False)) == tokenizer.decode(body[:-1])
    # an unfinished response keeps its last token
    assert decode(tokenizer, Response(body, False)) != decode(tokenizer, Response(body, True))
    assert decode(tokenizer, Response(body, True)) == tokenizer.decode(body[:-1])


# ---------------------------------------------------------------- batch_stream / total_steps


def numbered_pairs(n: int) -> list[Pair]:
    return [
        Pair(
            messages=[{"role": "user", "content": f"p{i}"}],
            chosen="c",
            rejected="r",
            prompt_ids=[20 + i],
            chosen_ids=[100 + i, 2],
            rejected_ids=[200 + i],
            negatives="random",
            source=i,
            rejected_source=(i + 1) % n,
        )
        for i in range(n)
    ]


def batch_members(batch) -> list[int]:
    inputs = np.array(batch.inputs)
    n = batch.n_pairs
    chosen, rejected = inputs[:n, 0] - 20, inputs[n:, 0] - 20
    assert chosen.tolist() == rejected.tolist()  # rejected rows follow the chosen rows, same order
    return chosen.tolist()


def take(stream, k):
    return [batch_members(next(stream)) for _ in range(k)]


@pytest.mark.parametrize("n, batch_size", [(5, 2), (6, 3), (7, 4), (3, 5)])
def test_batch_stream_full_batches_covering_epochs(n, batch_size):
    pairs = numbered_pairs(n)
    epochs = 4
    k = n * epochs // batch_size
    batches = take(batch_stream(pairs, batch_size, seed=0, pad=0), k)
    assert all(len(b) == batch_size for b in batches)
    flat = [i for b in batches for i in b]
    # the stream is epoch after epoch of permutations: each epoch holds every pair once
    for e in range(len(flat) // n):
        assert sorted(flat[e * n : (e + 1) * n]) == list(range(n))


def test_batch_stream_packs_the_pairs():
    pairs = numbered_pairs(4)
    batch = next(batch_stream(pairs, 2, seed=1, pad=0))
    members = batch_members(batch)
    inputs = np.array(batch.inputs)
    for row, i in enumerate(members):
        assert inputs[row, :2].tolist() == [
            20 + i,
            100 + i,
        ]  # prompt, chosen (EOS is a target only)
        assert inputs[2 + row, :1].tolist() == [20 + i]
    assert batch.n_pairs == 2


def test_batch_stream_deterministic_and_seeded():
    pairs = numbered_pairs(9)
    a = take(batch_stream(pairs, 4, seed=3, pad=0), 10)
    b = take(batch_stream(pairs, 4, seed=3, pad=0), 10)
    c = take(batch_stream(pairs, 4, seed=4, pad=0), 10)
    assert a == b
    assert a != c


def test_batch_stream_first_epoch_is_the_seeded_permutation():
    pairs = numbered_pairs(6)
    batches = take(batch_stream(pairs, 3, seed=11, pad=0), 4)
    expected = (
        np.random.default_rng([11, 0]).permutation(6).tolist()
        + np.random.default_rng([11, 1]).permutation(6).tolist()
    )
    assert [i for b in batches for i in b] == expected


def training_config(**kw) -> TrainingConfig:
    return TrainingConfig(**kw)


@pytest.mark.parametrize(
    "epochs, batch_size, accumulation, n_train",
    [
        (1, 4, 1, 100),
        (1, 4, 1, 101),
        (2, 4, 1, 10),
        (3, 2, 2, 7),
        (1, 8, 4, 5),
        (1, 4, 1, 0),
        (2, 3, 1, 1),
    ],
)
def test_total_steps_formula(epochs, batch_size, accumulation, n_train):
    config = training_config(epochs=epochs, batch_size=batch_size, grad_accumulation=accumulation)
    expected = max(1, math.ceil(epochs * n_train / (batch_size * accumulation)))
    assert total_steps(config, n_train) == expected


def test_total_steps_values():
    assert total_steps(training_config(), 100) == 25
    assert total_steps(training_config(), 101) == 26
    assert total_steps(training_config(epochs=3, batch_size=2, grad_accumulation=2), 7) == 6
    assert total_steps(training_config(), 0) == 1
    assert total_steps(training_config(iters=17), 1000) == 17
    assert total_steps(training_config(iters=3, epochs=5), 1000) == 3


# ---------------------------------------------------------------- length buckets


def _lengths_pairs(n, seed=0):
    from .builders import made_up_pairs

    return made_up_pairs(n, seed=seed)


@pytest.mark.parametrize("n,batch_size,buckets", [(40, 4, 4), (37, 4, 16), (10, 3, 2)])
def test_bucketed_epoch_visits_every_pair_once(n, batch_size, buckets):
    from mipo_mlx.engine.batching import epoch_order

    pairs = _lengths_pairs(n)
    for epoch in range(3):
        order = epoch_order(pairs, batch_size, seed=7, epoch=epoch, buckets=buckets)
        assert sorted(order) == list(range(n))


def test_buckets_cut_padding():
    """Sorted groups put similar lengths together: the padded area of an epoch shrinks."""
    from mipo_mlx.engine.batching import batch_stream

    pairs = _lengths_pairs(64, seed=3)

    def padded(buckets):
        stream = batch_stream(pairs, 4, seed=0, pad=0, buckets=buckets, shared=False)
        batches = [next(stream) for _ in range(16)]
        return sum(b.inputs.size for b in batches)

    def padded_exact(buckets):  # with pad_multiple 1, to see the effect on a small model
        from mipo_mlx.engine.batching import epoch_order

        order = epoch_order(pairs, 4, seed=0, epoch=0, buckets=buckets)
        total = 0
        for j in range(0, 64, 4):
            rows = [pairs[i] for i in order[j : j + 4]]
            total += 4 * max(
                len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in rows
            )
        return total

    assert padded(16) <= padded(1)
    assert padded_exact(16) < 0.9 * padded_exact(1)


def test_bucketed_and_unbucketed_batches_give_the_same_loss(toy_model):
    """The same epoch of pairs, batched at random or by length (shared prefix or not):
    the pair-weighted mean loss over the epoch is the same to 1e-5."""
    from mipo_mlx.core.config import TrainingConfig
    from mipo_mlx.engine.batching import batch_stream
    from mipo_mlx.engine.trainer import make_loss

    from .builders import made_up_pairs

    model, _ = toy_model
    pairs = made_up_pairs(24, seed=6)
    # References that differ from the policy, so the loss is not log 2
    for i, p in enumerate(pairs):
        p.reference_logps = {"chosen": -30.0 + i, "rejected": -40.0 + 0.5 * i}
    loss = make_loss(TrainingConfig(beta=0.1))

    def epoch_loss(buckets, shared):
        total, seen = 0.0, []
        stream = batch_stream(pairs, 4, seed=2, pad=0, buckets=buckets, shared=shared)
        for batch in (next(stream) for _ in range(6)):
            value, _ = loss(model, batch.tree())
            total += value.item() * batch.n_pairs
            seen.append(batch.n_pairs)
        return total / sum(seen)

    reference = epoch_loss(1, False)
    for buckets, shared in [(6, False), (1, True), (6, True)]:
        assert epoch_loss(buckets, shared) == pytest.approx(reference, abs=1e-5)
