"""Batched local generation that keeps the token ids as generated.

Scoring later uses these ids directly, so there is no decode/re-encode drift.
Each prompt samples from its own seeded random stream, so a prompt's response
does not depend on which other prompts share its batch (resume and sharding
give the same responses). `generate_all` spreads the prompts over the ranks and
keeps finished responses in a cache, so an interrupted pass resumes where it was.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from ..core.config import GenerationConfig
from ..core.errors import Stopped, UserError
from . import distributed as dist

STREAM_STRIDE = 1_000_003  # stream ids of the negative pass start here (positives use 0..N-1)


@dataclass
class Response:
    token_ids: list[int]  # as sampled; ends with the stop token when `finished`
    finished: bool  # False when max_tokens was reached before a stop token

    def to_row(self, index: int) -> dict:
        return {"index": index, "token_ids": self.token_ids, "finished": self.finished}

    @classmethod
    def from_row(cls, row: dict) -> Response:
        return cls(row["token_ids"], row["finished"])


class ResponseCache(Protocol):
    """Where one generation pass keeps its finished responses (the run folder's
    `responses.<pass>.jsonl`): rows of `Response.to_row`."""

    def rows(self) -> list[dict]: ...  # the rows saved so far (read by rank 0, sent to all)

    def record(self, index: int, response: Response) -> None: ...  # a no-op on ranks but 0


def decode(tokenizer, response: Response) -> str:
    """The response's text, without the stop token it ended with."""
    ids = response.token_ids[:-1] if response.finished else response.token_ids
    return tokenizer.decode(ids)


def usable(response: Response, config: GenerationConfig) -> bool:
    """The truncation rule: a response that hit max_tokens is dropped unless told to keep it."""
    return response.finished or config.truncated == "keep"


def usable_indices(responses: list[Response], config: GenerationConfig, needed: int) -> list[int]:
    """The responses the truncation rule keeps; at least `needed` of them."""
    keep = [i for i, response in enumerate(responses) if usable(response, config)]
    if len(keep) < needed:
        raise UserError(
            f"only {len(keep)} response(s) finished within generation.max_tokens="
            f"{config.max_tokens}; raise it or set generation.truncated=keep"
        )
    return keep


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit key seed for (run seed, stream): hashed, so no two pairs share one."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


BUCKET_SHIFT = 19  # a probability's bucket: its float32 bits but the low 19 (1/16 octave)
CHUNK = 256  # tokens a chunk of the inverse CDF's first level


def nucleus_floors(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Each row's least kept probability (B, 1) under `top_p`, of probabilities (B, V) float32.

    Most probable first, a token is kept while the mass before it is under `top_p`; tokens
    tied with the least kept one are kept too. Found without sorting the vocabulary: a
    positive float32's bits order as its value, so their top 13 bits bucket the
    probabilities; from each bucket's mass, the lowest bucket with less than `top_p` above it
    holds the least kept token, and only that bucket's members are sorted."""
    rows, vocab = probs.shape
    buckets = probs.view(np.int32) >> BUCKET_SHIFT  # (B, V), ordered as the values
    buckets -= buckets.min(axis=1, keepdims=True)  # each row's from 0: few, cached bins
    n = int(buckets.max()) + 1
    where = (buckets + n * np.arange(rows, dtype=np.int32)[:, None]).ravel()
    mass = np.bincount(where, weights=probs.ravel(), minlength=rows * n).reshape(rows, n)
    above = np.cumsum(mass[:, ::-1], axis=1)[:, ::-1] - mass  # (B, n) float64
    crossing = ((mass > 0) & (above < top_p)).argmax(axis=1)  # the lowest such bucket
    floors = np.empty((rows, 1), dtype=probs.dtype)
    for r in range(rows):
        members = np.sort(probs[r][buckets[r] == crossing[r]])[::-1]
        before = above[r, crossing[r]] + np.cumsum(members, dtype=np.float64) - members
        floors[r, 0] = members[(before < top_p).sum() - 1]  # the first member is kept
    return floors


def inverse_cdf(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Per row of non-negative weights (B, V), the first token whose cumulative weight passes
    `uniforms` (B,) in [0, 1) times the row's total: in two levels (chunks of CHUNK tokens,
    then the tokens of the one chunk), never a token of weight 0."""
    rows, vocab = weights.shape
    pad = -vocab % CHUNK
    chunked = np.pad(weights, ((0, 0), (0, pad))) if pad else weights
    chunked = chunked.reshape(rows, -1, CHUNK)  # (B, C, CHUNK)
    ends = np.cumsum(chunked.sum(axis=2, dtype=np.float64), axis=1)  # (B, C)
    target = uniforms * ends[:, -1]  # (B,)
    chunk = np.minimum((ends <= target[:, None]).sum(axis=1), ends.shape[1] - 1)
    index = np.arange(rows)
    start = np.where(chunk > 0, ends[index, chunk - 1], 0.0)
    inside = chunked[index, chunk]  # (B, CHUNK): the chunk the target falls in
    cumulative = start[:, None] + np.cumsum(inside, axis=1, dtype=np.float64)
    picked = (cumulative <= target[:, None]).sum(axis=1)
    last = CHUNK - 1 - (inside[:, ::-1] > 0).argmax(axis=1)  # its last token of weight > 0
    return chunk * CHUNK + np.minimum(picked, last)


def sample_rows(
    logits: np.ndarray, uniforms: np.ndarray, temperature: float, top_p: float
) -> np.ndarray:
    """One token per row of logits (B, V), the whole batch at once (a row may be shifted by
    any constant: log-probs give the same tokens).

    As mlx-lm's apply_top_p then categorical: the nucleus is the smallest set of most
    probable tokens whose mass (at temperature 1) reaches `top_p` (`nucleus_floors`); a token
    is then drawn from it with weights exp(logit / temperature), by inverse CDF from the
    row's own uniform in [0, 1) (B,). Every operation is per row, so a row's token depends
    only on its logits and its uniform. In numpy, where MLX's CPU sort and exp run 10-20x
    slower (BENCHMARKS.md), and without sorting or summing the whole vocabulary in order."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    probs = logits - logits.max(axis=-1, keepdims=True)  # (B, V), shifted; ours to reuse
    weights = np.exp(probs * (1.0 / temperature))  # (B, V)
    if top_p < 1:  # the probabilities at temperature 1, in place (a new array costs faults)
        np.exp(probs, out=probs)
        probs /= probs.sum(axis=-1, keepdims=True)
        probs = probs.astype(np.float32, copy=False)  # the floors' own values, compared
        weights *= probs >= nucleus_floors(probs, top_p)
    return inverse_cdf(weights, uniforms)


class DecodeLogits:
    """The model as generation's BatchGenerator calls it, with no log-softmax over the
    vocabulary: a decode step's logits (B, 1, V) are kept here for `StreamSampler`, which
    needs none, and BatchGenerator gets zeros (B, 1, 1) back, so its own log-softmax runs
    over one value, where over the vocabulary it is MLX's CPU exp (6 ms a step for 16 rows
    at 32k). Prompt processing (several tokens a row) passes through untouched:
    BatchGenerator keeps only its caches."""

    def __init__(self, model):
        self.model = model
        self.logits: mx.array | None = None  # the last decode step's (B, V)

    def __call__(self, inputs: mx.array, *args, **kwargs) -> mx.array:
        out = self.model(inputs, *args, **kwargs)
        if inputs.shape[1] != 1:
            return out
        self.logits = out[:, -1, :]
        return mx.zeros((out.shape[0], 1, 1), dtype=out.dtype)

    def __getattr__(self, name: str):  # layers, make_cache, args: the model's own
        return getattr(self.model, name)


class StreamSampler:
    """The sampler of every row of a generation batch: mlx-lm's BatchGenerator calls one
    shared sampler once per decode step on the whole batch (a sampler per row costs an MLX
    vocabulary sort and a dozen small ops per row and step). Each row still draws from its
    own stream, a generator seeded by its prompt's stream seed that gives one uniform per
    token, so a response does not depend on its batch. The step's logits come from
    `source` (`DecodeLogits`); `sample_rows` needs no log-softmax of them.

    Which prompt each row holds is read from the batch that calls: BatchGenerator's
    GenerationBatch keeps `uids` in row order."""

    def __init__(self, temperature: float, top_p: float, source: DecodeLogits):
        self.temperature, self.top_p, self.source = temperature, top_p, source
        self.seeds: dict[int, int] = {}  # uid -> stream seed, set once the uids are known
        self.streams: dict[int, np.random.Generator] = {}

    def __call__(self, ignored: mx.array) -> mx.array:  # BatchGenerator's (B, 1) -> (B,)
        caller = sys._getframe(1).f_locals.get("self")
        uids = getattr(caller, "uids", None)
        logits, self.source.logits = self.source.logits, None  # each step's, once
        if uids is None or logits is None or not len(uids) == logits.shape[0] == len(ignored):
            raise RuntimeError(
                "mlx-lm's BatchGenerator no longer samples from a batch holding `uids` in row "
                "order right after its decode step; mipo_mlx.engine.generation.StreamSampler needs "
                "updating for this mlx-lm version"
            )
        rows = np.array(logits.astype(mx.float32))  # (B, V): this step's forward runs here
        if self.temperature == 0:
            return mx.array(rows.argmax(axis=-1))
        draws = np.array([self._stream(uid).random() for uid in uids])  # (B,) in [0, 1)
        return mx.array(sample_rows(rows, draws, self.temperature, self.top_p))

    def _stream(self, uid: int) -> np.random.Generator:
        if uid not in self.streams:
            self.streams[uid] = np.random.default_rng(self.seeds[uid])
        return self.streams[uid]


def batch_generator(model, tokenizer, config: GenerationConfig):
    """mlx-lm's continuous-batching generator as generation uses it (the benchmark's
    per-row-sampler side uses the same one)."""
    from mlx_lm.generate import BatchGenerator

    return BatchGenerator(
        model,
        max_tokens=config.max_tokens,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        completion_batch_size=config.batch_size,
        prefill_batch_size=min(config.batch_size, 8),
    )


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    config: GenerationConfig,
    streams: list[int],
    on_done: Callable[[int, Response], None] | None = None,
) -> list[Response]:
    """Sample one response per prompt (token-id lists); `streams` name each prompt's random stream.

    `on_done(i, response)` is called as each response finishes, for progress and checkpoints.
    """
    if not prompts:
        return []
    source = DecodeLogits(model)
    generator = batch_generator(source, tokenizer, config)
    sampler = StreamSampler(config.temperature, config.top_p, source)
    try:
        uids = generator.insert(
            prompts,
            max_tokens=[config.max_tokens] * len(prompts),
            samplers=[sampler] * len(prompts),
        )
        sampler.seeds = {uid: stream_seed(config.seed, s) for uid, s in zip(uids, streams)}
        index = {uid: i for i, uid in enumerate(uids)}
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        results: list[Response | None] = [None] * len(prompts)
        while responses := generator.next_generated():
            for r in responses:
                tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    i = index[r.uid]
                    results[i] = Response(tokens.pop(r.uid), r.finish_reason == "stop")
                    if on_done is not None:
                        on_done(i, results[i])
    finally:
        generator.close()
    return results  # type: ignore[return-value]


def generate_all(
    model,
    tokenizer,
    ids: list[list[int]],
    config: GenerationConfig,
    stage: str,
    stream0: int,
    cache: ResponseCache | None = None,
    should_stop: Callable[[], bool] | None = None,
    streams: list[int] | None = None,
) -> list[Response]:
    """One response per prompt, prompt i sampling from stream `stream0 + i` (or `streams[i]`);
    with `cache`, the responses it holds are kept and the rest generated (and recorded as they
    finish).

    With several ranks, each generates every size-th prompt left to do and every rank gets
    every response (each prompt's stream is its own, so they equal one rank's)."""
    done = {
        row["index"]: Response.from_row(row)
        for row in dist.decided(cache.rows if cache is not None else list)
        if 0 <= row["index"] < len(ids)
    }
    todo = [i for i in range(len(ids)) if i not in done]
    mine = todo[dist.rank() :: dist.size()]
    with dist.progress(len(ids), stage) as progress:
        progress.update(len(done))

        def finished(k: int, response: Response) -> None:
            if cache is not None:
                cache.record(mine[k], response)
            progress.update(dist.size())
            if should_stop is not None and should_stop():
                raise Stopped(0)

        fresh = dict(
            zip(
                mine,
                generate(
                    model,
                    tokenizer,
                    [ids[i] for i in mine],
                    config,
                    streams=[streams[i] if streams else stream0 + i for i in mine],
                    on_done=finished,
                ),
            )
        )
    if dist.size() > 1:  # every rank's share to every rank; the cache records the others' too
        parts = dist.all_gather_objects([r.to_row(i) for i, r in fresh.items()])
        fresh = {row["index"]: Response.from_row(row) for part in parts for row in part}
        if cache is not None:
            for i in sorted(set(fresh) - set(mine)):
                cache.record(i, fresh[i])
    done.update(fresh)
    return [done[i] for i in range(len(ids))]
