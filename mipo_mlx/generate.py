"""Batched local generation that keeps the token ids as generated.

Scoring later uses these ids directly, so there is no decode/re-encode drift.
Each prompt samples from its own seeded random stream, so a prompt's response
does not depend on which other prompts share its batch (resume and sharding
give the same responses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .config import GenerationConfig

STREAM_STRIDE = 1_000_003  # stream ids of the negative pass start here (positives use 0..N-1)


@dataclass
class Response:
    token_ids: list[int]  # as sampled; ends with the stop token when `finished`
    finished: bool  # False when max_tokens was reached before a stop token


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit key seed for (run seed, stream): hashed, so no two pairs share one."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seeded_sampler(temperature: float, top_p: float, seed: int) -> Callable[[mx.array], mx.array]:
    """A sampler with its own random key, split once per token."""
    from mlx_lm.sample_utils import apply_top_p

    if temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    state = {"key": mx.random.key(seed)}

    def sample(logprobs: mx.array) -> mx.array:  # (1, V) -> (1,)
        state["key"], key = mx.random.split(state["key"])
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=key)

    return sample


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
    from mlx_lm.generate import BatchGenerator

    if not prompts:
        return []
    generator = BatchGenerator(
        model,
        max_tokens=config.max_tokens,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        completion_batch_size=config.batch_size,
        prefill_batch_size=min(config.batch_size, 8),
    )
    samplers = [seeded_sampler(config.temperature, config.top_p, stream_seed(config.seed, s)) for s in streams]
    try:
        uids = generator.insert(prompts, max_tokens=[config.max_tokens] * len(prompts), samplers=samplers)
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
