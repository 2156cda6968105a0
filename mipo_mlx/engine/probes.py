"""Fast paths, tried on the model in hand before they are used: the LM head on the scored positions
alone, a prefix run once, a prompt shared by a pair's two responses. A fast path that gives
other log-probs than the plain one is not taken, and the run says once why."""

from __future__ import annotations

import mlx.core as mx

from . import distributed as dist
from .batching import pack_pairs, pack_rows
from .logps import row_logps, summed_logps
from .prefix import (
    body_and_head,
    prefix_keys,
)

_said: set[str] = set()


def _fell_back(what: str, reason: str) -> bool:
    """Say once why a fast path is not taken (a bug there must not hide as slowness); False."""
    line = f"note: {what} ({reason}); using the slower path"
    if line not in _said:
        _said.add(line)
        dist.say(line)
    return False


def _gap(got: mx.array, want: mx.array) -> float:
    """max |got - want|, relative to the largest |want| (absolute below 1)."""
    return mx.abs(got - want).max().item() / max(1.0, mx.abs(want).max().item())


def _matches(what: str, got: mx.array, want: mx.array, tolerance: float) -> bool:
    gap = _gap(got, want)
    return gap <= tolerance or _fell_back(what, f"log-probs differ by {gap:.2e}")


def head_only_works(model, tolerance: float = 1e-3) -> bool:
    """Whether this model's blocks and LM head, called directly, give its own logits (then the
    head may run on the scored positions alone; a model that scales or caps its logits in
    `__call__`, or has no separate blocks, does not)."""
    what = "the LM head cannot run on response positions alone"
    try:
        ids = mx.arange(8)[None]
        body, head = body_and_head(model)
        return _matches(
            what, head(body(ids)).astype(mx.float32), model(ids).astype(mx.float32), tolerance
        )
    except Exception as err:  # no .model / .layers, or blocks that need other arguments
        return _fell_back(what, f"{type(err).__name__}: {err}")


def _suffix_logps(model, records, start: int, prompts, responses, pad_id: int) -> mx.array:
    """Log-probs of rows (prompt[start:], response), continuing `records` (a prefix of `start`
    tokens) when given; the LM head on response positions only."""
    rows = pack_rows([p[start:] for p in prompts], responses, pad_id)
    return row_logps(model, rows.tree(), records, head_only=True)


def prefix_reuse_works(model, tolerance: float = 1e-3) -> bool:
    """Whether rows continuing a common prefix's keys and values get the log-probs of whole rows."""
    what = "a prefix all prompts share cannot run once"
    try:
        prompts, responses = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7]], [[8, 9], [10, 11, 12]]
        whole = _suffix_logps(model, None, 0, prompts, responses, 0)
        records = prefix_keys(model, mx.array([prompts[0][:4]]))
        return _matches(
            what, _suffix_logps(model, records, 4, prompts, responses, 0), whole, tolerance
        )
    except Exception as err:  # blocks that reject the caches
        return _fell_back(what, f"{type(err).__name__}: {err}")


def sharing_works(model, pairs, pad_id: int, tolerance: float = 1e-3) -> bool:
    """Whether this model's attention takes a shared prompt prefix (standard mlx-lm attention
    with RoPE offsets and caches does; sliding windows and other layouts may not): the
    two packings must give the same log-probs on these pairs."""
    what = (
        "this model's attention does not take a shared prompt prefix (training.shared_prompt=off)"
    )
    try:  # no gradients: the scorer's path (on the CPU its log-softmax runs in numpy)
        shared = summed_logps(model, pack_pairs(pairs, pad_id, shared=True).tree())
        plain = summed_logps(model, pack_pairs(pairs, pad_id, shared=False).tree())
        return _matches(what, mx.array(shared), mx.array(plain), tolerance)
    # An architecture whose attention rejects the caches: the plain packing it is
    except Exception as err:
        return _fell_back(what, f"{type(err).__name__}: {err}")


def use_shared_prompt(model, pairs, choice: str, pad_id: int) -> bool:
    """training.shared_prompt: on, off, or auto (on when this model gives the same log-probs)."""
    if choice != "auto" or not pairs:
        return choice == "on"
    return sharing_works(model, pairs[:2], pad_id)
