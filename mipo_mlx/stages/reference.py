"""The reference stage: every pair's chosen and rejected responses scored once under the base model
(adapters off), stored with the pairs."""

from __future__ import annotations

from ..engine import distributed as dist
from ..engine.scoring import score_pairs


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
