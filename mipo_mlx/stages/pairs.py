"""The pairs stage: the model answers each prompt (chosen), the negative strategy makes the
rejected answers (`negatives.NEGATIVES`), pairs with the same text on both sides are dropped,
and a share is held out for validation.

A pair is (x, y+, y-): y+ is the model's answer to x; y- is an answer made without x's
information, always scored under x. `data.pair_file` holds the pairs' schema.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..core.config import DataConfig, PairsConfig
from ..core.errors import UserError
from ..data.pair_file import Pair
from ..data.prompts import Rendered
from ..engine import distributed as dist
from .negatives import NEGATIVES
from .run import Run


def check_pairs_possible(rendered: Rendered, config: PairsConfig, data: DataConfig) -> None:
    """Input problems the negative strategy would hit, found before any generation or write."""
    NEGATIVES[config.negatives].check(rendered, config, data)


def make_pairs(run: Run, rendered: Rendered, k: int = 1) -> list[Pair]:
    """Round k's pairs: those the run folder holds (an interrupted or finished run's), else
    new ones. The model answers with the adapters it has, and from round 2 on draws from
    other seeds (generation.seed + k - 1); each generation pass is kept in the run folder as
    it goes, so an interrupted pass resumes."""
    if not rendered.prompts:
        raise ValueError("no prompts to pair: render them first (data.prompts.render_prompts)")
    pairs = run.folder.pairs(run.vocab)
    if pairs is not None:
        dist.say(f"reusing {len(pairs)} pairs from {run.folder.path / 'pairs.jsonl'}")
        return pairs
    c = run.config
    if rendered.skipped and k == 1:
        dist.say(
            f"skipped {rendered.skipped} prompt(s) longer than data.max_prompt_tokens="
            f"{c.data.max_prompt_tokens}"
        )
    generation = replace(c.generation, seed=c.generation.seed + k - 1)
    caches = {name: run.folder.responses(name, run.vocab) for name in ("chosen", "rejected")}
    pairs = NEGATIVES[c.pairs.negatives].pairs(run, rendered, generation, caches)
    if c.pairs.drop_identical:
        pairs = drop_identical(pairs)
    return split_pairs(pairs, c.data.valid_fraction, c.pairs.seed)


def drop_identical(pairs: list[Pair]) -> list[Pair]:
    """The pairs whose chosen and rejected answers differ: a pair with the same text on both
    sides has a zero DPO gradient but would count in its batch's mean."""
    kept = [p for p in pairs if p.chosen != p.rejected]
    if len(kept) < len(pairs):
        dist.say(
            f"dropped {len(pairs) - len(kept)} of {len(pairs)} pairs with the same text on "
            "both sides"
        )
    if not kept:
        raise UserError(
            f"all {len(pairs)} pairs have the same text on both sides: nothing to learn; raise "
            "generation.temperature, or set pairs.drop_identical=false"
        )
    return kept


def split_pairs(pairs: list[Pair], valid_fraction: float, seed: int) -> list[Pair]:
    """Mark a seeded random share of pairs as 'valid' (held out from training)."""
    n_valid = int(round(len(pairs) * valid_fraction))
    if n_valid and len(pairs) - n_valid < 1:
        n_valid = len(pairs) - 1
    chosen = set(np.random.default_rng(seed + 1).permutation(len(pairs))[:n_valid].tolist())
    for i, pair in enumerate(pairs):
        pair.split = "valid" if i in chosen else "train"
    return pairs
