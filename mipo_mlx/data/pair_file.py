"""The pair file (`pairs.jsonl`): one schema, validated when read.

It uses the official release's chat format, so other trainers can read it, plus the token
ids and the stored reference log-probs:
  {"chosen":   [{"role": "user", "content": x}, {"role": "assistant", "content": y+}],
   "rejected": [{"role": "user", "content": x}, {"role": "assistant", "content": y-}],
   "prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...],
   "negatives": "random", "source": j, "split": "train",
   "reference_logps": {"chosen": -12.3, "rejected": -45.6}}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.files import read_jsonl, write_jsonl


@dataclass(kw_only=True)
class Pair:
    messages: list[dict[str, str]]  # the prompt's chat turns (ending with the user turn x)
    chosen: str
    rejected: str
    prompt_ids: list[int]  # x through the chat template, generation prompt included
    chosen_ids: list[int]  # y+ as generated (stop token included when it stopped)
    rejected_ids: list[int]  # y- as generated, scored under x
    negatives: str  # the strategy that made y-
    source: int  # index of the prompt whose answer y+ is
    rejected_source: int | None = None  # random: the prompt y- answered
    rejected_prompt: str | None = None  # incomplete/no_context/random_context: what y- answered
    split: str = "train"
    reference_logps: dict[str, float] | None = None

    @property
    def length(self) -> int:
        """Tokens in the longer of its two rows (prompt + response): what a batch pads to."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def to_row(self) -> dict:
        row = asdict(self)
        messages = row.pop("messages")
        row["chosen"] = messages + [{"role": "assistant", "content": self.chosen}]
        row["rejected"] = messages + [{"role": "assistant", "content": self.rejected}]
        return {k: v for k, v in row.items() if v is not None}


REQUIRED = ("chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids", "negatives", "source")


def are_token_ids(value, vocab: int | None) -> bool:
    """A list of whole numbers in [0, vocab) (any non-negative ones without `vocab`)."""
    return isinstance(value, list) and all(
        type(t) is int and 0 <= t < (vocab or 2**31) for t in value
    )


def _id_list(value, key: str, where: str, vocab: int | None) -> list[int]:
    if not value or not are_token_ids(value, vocab):
        below = f" below the vocabulary size {vocab}" if vocab else ""
        raise UserError(
            f"{where}: '{key}' must be a non-empty list of token ids{below}; "
            "regenerate the pair file"
        )
    return value


def _finite(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _is_answer(turn) -> bool:
    return (
        isinstance(turn, dict)
        and turn.get("role") == "assistant"
        and isinstance(turn.get("content"), str)
    )


def pair_from_row(row: dict, where: str, vocab: int | None = None) -> Pair:
    """Validate one pair-file row (the schema above) and build a `Pair`; with `vocab`, every
    token id must be below it (an id past the embedding table would crash the process)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a pair must be a JSON object; regenerate the pair file")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(missing)}; regenerate the pair file")
    if not isinstance(row["negatives"], str) or type(row["source"]) is not int:
        raise UserError(f"{where}: 'negatives' must be a name and 'source' a row number")
    if row.get("split", "train") not in ("train", "valid"):
        raise UserError(f"{where}: 'split' must be train or valid")
    chosen, rejected = row["chosen"], row["rejected"]
    if (
        not isinstance(chosen, list)
        or not isinstance(rejected, list)
        or len(chosen) < 2
        or chosen[:-1] != rejected[:-1]
        or not _is_answer(chosen[-1])
        or not _is_answer(rejected[-1])
    ):
        raise UserError(
            f"{where}: 'chosen' and 'rejected' must share the prompt turns and end with an "
            "assistant turn {role: assistant, content: text}"
        )
    ref = row.get("reference_logps")
    if ref is not None and not (
        isinstance(ref, dict)
        and {"chosen", "rejected"} <= set(ref)
        and _finite(ref["chosen"])
        and _finite(ref["rejected"])
    ):
        raise UserError(
            f"{where}: 'reference_logps' must hold finite 'chosen' and 'rejected' log-probs"
        )
    return Pair(
        messages=chosen[:-1],
        chosen=chosen[-1]["content"],
        rejected=rejected[-1]["content"],
        prompt_ids=_id_list(row["prompt_ids"], "prompt_ids", where, vocab),
        chosen_ids=_id_list(row["chosen_ids"], "chosen_ids", where, vocab),
        rejected_ids=_id_list(row["rejected_ids"], "rejected_ids", where, vocab),
        negatives=row["negatives"],
        source=row["source"],
        rejected_source=row.get("rejected_source"),
        rejected_prompt=row.get("rejected_prompt"),
        split=row.get("split", "train"),
        reference_logps=ref,
    )


def read_pairs(path: str | Path, vocab: int | None = None) -> list[Pair]:
    return [pair_from_row(row, f"{path}:{n}", vocab) for n, row in read_jsonl(path, "pairs")]


def write_pairs(path: str | Path, pairs: list[Pair]) -> None:
    write_jsonl(path, (p.to_row() for p in pairs))
