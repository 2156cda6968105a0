"""The reference stage: every pair's chosen and rejected responses scored once, before training,
under the model that made them (the base in round 1, the previous round's adapters after),
and stored with the pairs: training never runs a reference forward."""

from __future__ import annotations

from ..data.pair_file import Pair
from ..engine import distributed as dist
from ..engine.probes import use_shared_prompt
from ..engine.scoring import score_pairs
from .run import Run


def shared_prompt(run: Run, pairs: list[Pair]) -> bool:
    """Whether each prompt runs once for both responses (training.shared_prompt; with auto, when
    this model gives the same log-probs that way): the packing scoring and training share."""
    return use_shared_prompt(run.model, pairs, run.config.training.shared_prompt, run.pad)


def check_pairs(pairs: list[Pair]) -> None:
    """The reference stage's input: pairs, each with a prompt and two responses of tokens."""
    if not pairs:
        raise ValueError("no pairs to score: make them first (stages.pairs.make_pairs)")
    empty = [p for p in pairs if not (p.prompt_ids and p.chosen_ids and p.rejected_ids)]
    if empty:
        raise ValueError(
            f"{len(empty)} pair(s) without prompt or response tokens (the first from prompt "
            f"{empty[0].source}); make the pairs with stages.pairs.make_pairs"
        )


def score_reference(run: Run, pairs: list[Pair], shared: bool = False) -> int:
    """Score the pairs that have no reference log-probs yet (all of them, for new pairs) with
    the packing training uses, and write the pairs, scores included, to the run folder.
    Returns how many were scored."""
    check_pairs(pairs)
    unscored = [p for p in pairs if p.reference_logps is None]
    if not unscored:
        return 0
    where = run.folder.path / "pairs.jsonl"
    fresh = not where.is_file()  # new pairs, not a pairs file's that had no scores (rank 0 says)
    add_reference_logps(run.model, unscored, run.pad, run.config.training.score_batch_size, shared)
    run.folder.write_pairs(pairs)
    if fresh:
        dist.say(f"wrote {len(pairs)} pairs ({run.config.pairs.negatives} negatives) to {where}")
    else:  # never trained against a zero reference (reference-free DPO)
        dist.say(
            f"scored the reference log-probs of {len(unscored)} pair(s) of {where} that had none"
        )
    return len(unscored)


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
