"""Summed response log-probs of (prompt, response) token sequences.

One primitive (`token_logps`: log p(target) = logit[target] - logsumexp(logits)) and
one packing (`Rows`: token rows, the scored positions and the row each belongs to)
serve training batches, evaluation rows and the export check. Only response tokens
are scored: the prompt is masked, the stop token the model generated is scored,
padding never is, and nothing is length-normalised (MIPO's DPO log-probs are sums
over the response). Chosen and rejected go through the model in one batched forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import distributed as dist
from .prefix import (
    AfterPrefix,
    RecordKV,
    body_and_head,
    chunked,
    common_prefix,
    prefix_keys,
)

PAD_MULTIPLE = 32  # fewer distinct shapes -> fewer recompiles of the compiled step
# Logits one scoring batch may hold (float32 values, 128 MB): at a 32k vocabulary 1,024
# scored positions, at 128k 256. The logits, not the tokens, set a scoring batch's peak.
LOGITS_BUDGET = 1 << 25
LOG2E = 1.4426950408889634
# Rows a CPU log-softmax takes at a time: its (rows, V) temporary, not a second (K, V) array
SOFTMAX_ROWS = 128


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


def token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """log p(target) under each row of logits: (K, V), (K,) -> (K,), in float32."""
    logits = logits.astype(mx.float32)
    if mx.default_device() == mx.cpu:
        return _cpu_token_logps(logits, targets)
    return mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(
        logits, axis=-1
    )


def _exp(x: mx.array) -> mx.array:
    """e ** x as 2 ** (x log2 e): on MLX's CPU backend `power` runs about twice as fast as
    `exp` (BENCHMARKS.md, "Interleaved quick run") and is as exact (both within 4e-6 of float64)."""
    return mx.power(2.0, x * LOG2E)


@mx.custom_function
def _cpu_token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """`token_logps` for MLX's CPU backend, where the two passes of `exp` over (K, V) (one
    forward, one in the gradient) are most of the log-softmax's time: both use `_exp`."""
    top = logits.max(axis=-1, keepdims=True)  # (K, 1)
    # SOFTMAX_ROWS at a time: the exponentials of all rows would be a (K, V) array
    step = SOFTMAX_ROWS
    sums = [
        _exp(logits[s : s + step] - top[s : s + step]).sum(axis=-1)
        for s in range(0, logits.shape[0], step)
    ]
    logsumexp = mx.log(mx.concatenate(sums)) + top[:, 0]
    return mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - logsumexp


@_cpu_token_logps.vjp
def _cpu_token_logps_vjp(primals, cotangent, output):
    # d logp_k / d logits_k = onehot(target_k) - softmax(logits_k)
    logits, targets = primals
    cot = cotangent[:, None]  # (K, 1)
    logsumexp = mx.take_along_axis(logits, targets[:, None], axis=-1) - output[:, None]
    # One element-wise pass (fused when compiled) and one (K, V) array: no scatter copy
    onehot = mx.arange(logits.shape[-1]) == targets[:, None]
    grad = cot * (onehot.astype(mx.float32) - _exp(logits - logsumexp))  # (K, V)
    return grad, mx.zeros_like(targets)


def scored_logits(
    model,
    rows: dict[str, mx.array],
    records: list[RecordKV] | None = None,
    head_only: bool = False,
) -> mx.array:
    """Logits (K, V) at the scored positions of `rows` (a `Rows.tree()`).

    A prefix in the rows runs once through the blocks; `records` are the keys and values
    of a prefix computed before (one row, shared by all rows). With a prefix or
    `head_only`, only the scored positions go through the LM head; otherwise the model's
    own call gives every position's logits (for models that change logits in `__call__`)."""
    inputs, positions = rows["inputs"], rows["positions"]
    if rows["prefix"].shape[1] > 0:
        records = prefix_keys(model, rows["prefix"])
        lengths = rows["prefix_lengths"]
    elif records is not None:
        lengths = mx.array([records[0].keys.shape[2]], dtype=mx.int32)
    elif not head_only:
        logits = model(inputs)  # (N, T, V)
        return logits.reshape(-1, logits.shape[-1])[positions]
    body, head = body_and_head(model)
    if records is None:  # a model may take no caches: one pass
        hidden = body(inputs)
    else:
        cache = [AfterPrefix(r, lengths, inputs.shape[0] // r.keys.shape[0]) for r in records]
        hidden = chunked(body, inputs, cache)  # (N, T, H)
    return head(hidden.reshape(-1, hidden.shape[-1])[positions])


def row_logps(
    model,
    rows: dict[str, mx.array],
    records: list[RecordKV] | None = None,
    head_only: bool = False,
) -> mx.array:
    """Each row's summed log-prob of its scored tokens, (N,)."""
    logps = token_logps(scored_logits(model, rows, records, head_only), rows["targets"])  # (K,)
    return logps @ rows["owners"]  # (N,): each row's sum; the dummies weigh 0


def summed_logps(
    model, rows: dict[str, mx.array], records: list[RecordKV] | None = None, head_only=False
) -> np.ndarray:
    """`row_logps` for scoring without gradients, (N,), with one evaluation (a sync point).
    On the CPU the log-softmax runs in numpy: MLX's CPU exp is ~20x slower than numpy's, and
    over a 32k vocabulary it costs as much as the LM head's matmul."""
    if mx.default_device() != mx.cpu:
        logps = row_logps(model, rows, records, head_only)
        mx.eval(logps)
        return np.array(logps.tolist())
    logits = scored_logits(model, rows, records, head_only).astype(mx.float32)  # (K, V)
    picked = mx.take_along_axis(logits, rows["targets"][:, None], axis=-1)[:, 0]  # (K,)
    mx.eval(logits, picked)
    z = np.asarray(logits)  # (K, V), MLX's own buffer (no copy)
    logsumexp = np.empty(len(z), dtype=np.float32)  # (K,)
    step = SOFTMAX_ROWS  # a whole copy would double memory
    for start in range(0, len(z), step):
        part = z[start : start + step]
        top = part.max(axis=1)
        shifted = part - top[:, None]
        np.exp(shifted, out=shifted)
        logsumexp[start : start + step] = np.log(shifted.sum(axis=1)) + top
    token = np.asarray(picked) - logsumexp  # (K,)
    return (token.astype(np.float64) @ np.asarray(rows["owners"], dtype=np.float64)).astype(
        np.float32
    )


def pair_logps(model, batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
    """(chosen, rejected) summed log-probs, each (B,), from one forward of the 2B rows."""
    logps = row_logps(model, batch)
    n = batch["inputs"].shape[0] // 2
    return logps[:n], logps[n:]


def sequence_logps(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Sum over masked positions of log p(target | inputs so far), from full logits:
    (N, T) -> (N,)."""
    logits = model(inputs)  # (N, T, V)
    logps = token_logps(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))  # (N * T,)
    return (logps.reshape(targets.shape) * mask).sum(axis=-1)


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


def response_logps(
    model,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    token_budget: int = 16384,
    min_shared: int = 64,
    on_batch: Callable[[int], None] | None = None,
    logits_budget: int = LOGITS_BUDGET,
) -> np.ndarray:
    """log p(response_r | prompt_r) for each row r, (N,), in batches of about `token_budget`
    padded tokens and at most `logits_budget` logits (rows sorted by length; one mx.eval per
    batch; a row longer than the budgets is a batch of its own). When the model allows it,
    the LM head runs on the response positions only, and a prefix all prompts share (a
    few-shot prompt's exemplars, at least `min_shared` tokens) runs once, the rows attending
    to its keys and values; otherwise full logits are computed, a few rows at a time.
    `on_batch(n)` is called after each batch of n rows."""
    head_only = head_only_works(model)
    start = common_prefix(prompts) if head_only else 0
    records = None
    if start >= min_shared and prefix_reuse_works(model):
        records = prefix_keys(model, mx.array([list(prompts[0][:start])]))
        mx.eval([(r.keys, r.values) for r in records])
    else:
        start = 0
    vocab = getattr(getattr(model, "args", None), "vocab_size", None) or 1
    positions = max(1, logits_budget // vocab)  # scored positions (head only) in a batch
    # Without head_only every padded position gets logits
    budget = token_budget if head_only else min(token_budget, 2048, positions)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    width = [
        _width(len(prompts[i]) - start + len(responses[i]), PAD_MULTIPLE)
        for i in range(len(prompts))
    ]
    out = np.zeros(len(prompts))
    first = 0
    while first < len(order):
        end, scored = first + 1, len(responses[order[first]])
        while (
            end < len(order)
            and (end + 1 - first) * width[order[end]] <= budget
            and (not head_only or scored + len(responses[order[end]]) <= positions)
        ):
            scored += len(responses[order[end]])
            end += 1
        rows = order[first:end]
        packed = pack_rows([prompts[i][start:] for i in rows], [responses[i] for i in rows], pad_id)
        out[rows] = summed_logps(model, packed.tree(), records, head_only)
        first = end
        if on_batch is not None:
            on_batch(len(rows))
    return out


def grouped_logps(
    model,
    prompts: Sequence[list[int]],
    columns: Sequence[Sequence[list[int]]],
    pad_id: int,
    token_budget: int = 16384,
    on_batch: Callable[[int], None] | None = None,
    logits_budget: int = LOGITS_BUDGET,
) -> np.ndarray:
    """log p(columns[c][i] | prompts[i]) for every column c and prompt i, (G, P): each prompt
    runs once through the blocks for its G responses (`pack_grouped`), in batches of whole
    prompts within both budgets (prompts sorted by length). The model must take a prompt
    prefix (`prefix_reuse_works`). `on_batch(n)` is called after each batch of n rows."""
    n_columns = len(columns)
    vocab = getattr(getattr(model, "args", None), "vocab_size", None) or 1
    positions = max(1, logits_budget // vocab)
    size = [
        (len(prompts[i]), max(len(column[i]) for column in columns)) for i in range(len(prompts))
    ]
    order = sorted(range(len(prompts)), key=lambda i: sum(size[i]))
    out = np.zeros((n_columns, len(prompts)))
    first = 0
    while first < len(order):
        end = first + 1
        while end < len(order):
            prompt, response = size[order[end]]
            width = _width(prompt, PAD_MULTIPLE) + n_columns * _width(response + 1, PAD_MULTIPLE)
            if (end + 1 - first) * width > token_budget or (
                (end + 1 - first) * n_columns * response > positions
            ):
                break
            end += 1
        batch = order[first:end]
        packed = pack_grouped(
            [prompts[i] for i in batch], [[column[i] for i in batch] for column in columns], pad_id
        )
        out[:, batch] = summed_logps(model, packed.tree(), head_only=True).reshape(n_columns, -1)
        first = end
        if on_batch is not None:
            on_batch(n_columns * len(batch))
    return out


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


def score_pairs(
    model,
    pairs,
    pad_id: int,
    batch_size: int,
    shared: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, float]]:
    """Log-probs of every pair's chosen and rejected response; one mx.eval per batch.

    Pairs are sorted by length so that batches hold rows of similar width.
    """
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pack_pairs([pairs[i] for i in idx], pad_id, shared).tree()
        logps = summed_logps(model, batch).tolist()  # (2B,): chosen rows, then rejected
        for i, c, r in zip(idx, logps[: len(idx)], logps[len(idx) :]):
            out[i] = (c, r)
        if on_batch is not None:
            on_batch(len(idx))
    return out


def use_shared_prompt(model, pairs, choice: str, pad_id: int) -> bool:
    """training.shared_prompt: on, off, or auto (on when this model gives the same log-probs)."""
    if choice != "auto" or not pairs:
        return choice == "on"
    return sharing_works(model, pairs[:2], pad_id)


def add_reference_logps(model, pairs, pad_id: int, batch_size: int, shared: bool = False) -> None:
    """Score every pair once under the base model (no adapters); stored with the pairs.
    With several ranks, each scores every size-th pair and all get every score."""
    mine = dist.shard(len(pairs))
    with dist.progress(len(pairs), "score reference") as progress:
        scores = score_pairs(
            model,
            [pairs[i] for i in mine],
            pad_id,
            batch_size,
            shared,
            on_batch=lambda n: progress.update(n * dist.size()),
        )
    if dist.size() > 1:  # put them back in order
        parts = dist.all_gather_objects(scores)
        scores = [parts[i % dist.size()][i // dist.size()] for i in range(len(pairs))]
    for pair, (chosen, rejected) in zip(pairs, scores):
        pair.reference_logps = {"chosen": chosen, "rejected": rejected}
