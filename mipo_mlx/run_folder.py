"""The run folder: what a run writes, what an earlier run left, and resuming into it.

Only rank 0 has the folder (the other ranks' hosts may not share its disk). Every read
of it is rank 0's and reaches every rank through `distributed.decided`, and every write
is rank 0's alone: whatever the folder holds, all ranks take the same branch and meet
the same collectives.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from . import checkpoint as ckpt
from . import distributed as dist
from . import model as mdl
from .config import Config, LoraConfig, to_dict, to_yaml
from .errors import UserError
from .files import (
    append_jsonl,
    folder_lock,
    partial_and_old,
    read_jsonl,
    read_lines,
    write_json,
    write_jsonl,
    write_text,
)
from .generate import Response
from .pair_file import Pair, are_token_ids, pair_from_row, write_pairs
from .prompts import Prompt, prompt_row

# Files of the stages a rerun reuses; an overwrite clears them. With the final outputs, they mark
# a run.
STAGE_FILES = (
    "inputs.json",
    "metrics.jsonl",
    "pairs.jsonl",
    "eval_base.json",
    "guard_base.json",
    "guard.json",
    "responses.chosen.jsonl",
    "responses.rejected.jsonl",
    "train_prompts.jsonl",
    "eval_prompts.jsonl",
)
RUN_FILES = ("config.yaml", "adapters.safetensors", "eval.json", *STAGE_FILES, ckpt.NAME)
# Settings that may differ between an interrupted run and its resumption: the run folder
# resumes wherever it is now (moved, copied, or named from another working directory), and
# where the metrics are also sent changes nothing the run computes.
MAY_CHANGE = {
    "output.dir",
    "output.overwrite",
    "training.memory_limit_gb",
    "training.report_to",
    "training.run_name",
    "evaluation.plots",
}
# Settings naming local files or folders, kept absolute in config.yaml so that resume,
# evaluate and export read the same ones from any working directory.
LOCAL_PATHS = (
    "model.path",
    "data.prompts",
    "evaluation.prompts",
    "evaluation.judge",
    "guard.prompts",
)


def portable(config: Config) -> Config:
    """A copy of `config` whose local paths are absolute (a Hub id stays as written)."""
    config = copy.deepcopy(config)
    for dotted in LOCAL_PATHS:
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            setattr(getattr(config, section), key, str(Path(value).expanduser().resolve()))
    config.output.dir = str(Path(config.output.dir).resolve())
    return config


def _flat(data: dict) -> dict:
    return {f"{s}.{k}": v for s, body in data.items() for k, v in body.items()}


def check_same_run(out: Path, config: Config) -> None:
    """Resuming into `out` needs the settings it was started with (a few may change)."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"{out}: no config.yaml, so no run to resume; start it without --resume")
    saved = _flat(yaml.safe_load(saved_path.read_text()) or {})
    now = _flat(to_dict(portable(config)))
    for key in sorted(now):
        if key not in MAY_CHANGE and saved.get(key) != now[key]:
            raise UserError(
                f"{out}: belongs to another run ({key} was {saved.get(key)!r}, now {now[key]!r}); "
                "resume with the same settings or choose another output.dir"
            )


INPUTS = "inputs.json"  # fingerprints of what the run's answers and pairs were made from
INPUT_NAMES = {
    "train_prompts": "the training prompts (data.prompts)",
    "heldout_prompts": "the held-out prompts (evaluation.prompts)",
}


def fingerprint(data) -> str:
    """A short hash of bytes, or of JSON-able data (token ids, labels)."""
    if not isinstance(data, bytes):
        data = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def check_inputs(out: Path, now: dict[str, str]) -> None:
    """Resuming needs the inputs the run started from: cached answers belong to prompts by
    position, so a reordered or edited prompt file would attach them to other prompts."""
    path = out / INPUTS
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
        assert isinstance(saved, dict)
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise UserError(f"{path}: damaged; start the run again in a new output.dir") from None
    for key, value in now.items():
        if saved.get(key, value) != value:
            raise UserError(
                f"{out}: {INPUT_NAMES[key]} changed since the run started, and its saved answers "
                "and pairs were made from the old ones; restore them or start a new run"
            )


def check_run_folder(out: Path, config: Config, resume: bool) -> None:
    """Refuse a folder that cannot take this run (a new one, or the resumption of `config`'s
    run); changes nothing on disk."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another output.dir")
    if resume:
        check_same_run(out, config)
        return
    earlier = [name for name in RUN_FILES if (out / name).exists()] + [
        p.name for p in sorted(out.glob("round-*"))
    ]
    if earlier and not config.output.overwrite:
        raise UserError(
            f"{out}: holds an earlier run ({', '.join(earlier)}); choose another "
            "output.dir or pass --output.overwrite true"
        )


class ResponseFile:
    """One generation pass's finished responses, a line each (`responses.<pass>.jsonl`), so an
    interrupted pass resumes with the responses it had (each prompt samples from its own
    seeded stream, so the resumed responses are the uninterrupted ones)."""

    def __init__(self, path: Path, vocab: int | None = None):
        self.path, self.vocab = path, vocab

    def rows(self) -> list[dict]:
        """The saved responses, each checked (a hand-edited or damaged line is one error)."""
        rows = read_lines(self.path)
        for number, row in enumerate(rows, start=1):
            if not (
                isinstance(row, dict)
                and type(row.get("index")) is int
                and row["index"] >= 0
                and are_token_ids(row.get("token_ids"), self.vocab)
                and type(row.get("finished")) is bool
            ):
                raise UserError(
                    f"{self.path}: response {number} is not an index, token ids"
                    + (f" below {self.vocab}" if self.vocab else "")
                    + " and a finished flag; delete the file to generate these answers again"
                )
        return rows

    def record(self, index: int, response: Response) -> None:
        dist.main_only(append_jsonl, self.path, response.to_row(index))


class RunFolder:
    """The output folder of one run, as every rank sees it."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def round(self, k: int) -> RunFolder:
        """Round k's folder: the run folder for round 1, its `round-<k>/` for later rounds."""
        if k == 1:
            return self
        folder = RunFolder(self.path / f"round-{k}")
        dist.main_only(folder.path.mkdir, parents=True, exist_ok=True)
        return folder

    def check(self, config: Config, resume: bool) -> None:
        dist.main_only(check_run_folder, self.path, config, resume)

    def locked(self) -> contextlib.AbstractContextManager:
        """The run holds its folder for as long as it runs (the main rank locks it): a second
        run on it stops with one line naming the holder, before it reads or writes anything."""
        return folder_lock(self.path) if dist.is_main() else contextlib.nullcontext()

    def start(self, config: Config) -> None:
        """Create the folder and write config.yaml; with overwrite, clear the earlier run's stage
        files."""
        dist.main_only(self._start, config)

    def _start(self, config: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for name in STAGE_FILES:  # overwrite was asked for: start anew
            (self.path / name).unlink(missing_ok=True)
        for folder in (self.path / ckpt.NAME, *partial_and_old(self.path / ckpt.NAME)):
            if folder.exists():
                shutil.rmtree(folder)
        earlier_rounds = ("round-*", "eval_round-*.json", "guard_round-*.json")
        for earlier in (p for pattern in earlier_rounds for p in self.path.glob(pattern)):
            if earlier.is_dir():
                shutil.rmtree(earlier)
            else:
                earlier.unlink()
        write_text(self.path / "config.yaml", to_yaml(portable(config)))

    def check_inputs(self, inputs: dict[str, str]) -> None:
        dist.main_only(check_inputs, self.path, inputs)

    def keep_inputs(self, inputs: dict[str, str]) -> None:
        dist.main_only(write_json, self.path / INPUTS, inputs)

    def keep_prompts(self, name: str, prompts: list[Prompt]) -> None:
        """Prompts read from a public dataset, as this project's JSONL (inspectable, and usable
        as data.prompts or evaluation.prompts of a later run)."""
        dist.main_only(write_jsonl, self.path / name, map(prompt_row, prompts))

    def responses(self, name: str, vocab: int | None = None) -> ResponseFile:
        return ResponseFile(self.path / f"responses.{name}.jsonl", vocab)

    def pairs(self, vocab: int | None = None) -> list[Pair] | None:
        """The pairs of an earlier attempt (written whole at the end of their stage), or None;
        checked against the schema, token ids below `vocab`."""
        path = self.path / "pairs.jsonl"
        rows = dist.decided(
            lambda: [row for _, row in read_jsonl(path, "pairs")] if path.is_file() else None
        )
        if rows is None:
            return None
        return [pair_from_row(row, f"{path}:{n}", vocab) for n, row in enumerate(rows, 1)]

    def write_pairs(self, pairs: list[Pair]) -> None:
        dist.main_only(write_pairs, self.path / "pairs.jsonl", pairs)

    def cached_json(self, name: str, compute: Callable[[], dict]) -> dict:
        """The JSON file `name` if an earlier attempt wrote it, else `compute()` (run on every
        rank: it may hold collectives) written there."""
        path = self.path / name
        value = dist.decided(lambda: json.loads(path.read_text()) if path.is_file() else None)
        if value is None:
            value = compute()
            dist.main_only(write_json, path, value)
        return value

    def append_metrics(self, row: dict) -> None:
        dist.main_only(append_jsonl, self.path / "metrics.jsonl", row)

    def trim_metrics(self, last_step: int) -> list[dict]:
        """Keep the metric lines up to the checkpoint's step (later ones will be logged again);
        returns the lines kept (rank 0's: the other ranks get none)."""
        path = self.path / "metrics.jsonl"
        kept: list[dict] = []

        def trim() -> None:
            if path.exists():
                kept.extend(r for r in read_lines(path) if r.get("step", 0) <= last_step)
                write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

        dist.main_only(trim)
        return kept

    def save_adapters(
        self, model, lora: LoraConfig, base_model: str, step: int | None = None
    ) -> None:
        """The adapters (mlx-lm's format); with `step`, also a copy named after it."""
        dist.main_only(mdl.save_adapters, self.path, model, lora, base_model)
        if step is not None:
            dist.main_only(
                mdl.save_adapters,
                self.path,
                model,
                lora,
                base_model,
                name=f"{step:07d}_adapters.safetensors",
            )

    def round_adapters(self, k: int, model, lora: LoraConfig, base_model: str) -> None:
        """Round k's adapters of a run of several rounds, kept in `round-<k>/` (round 1's too):
        `mlx_lm.load(model, adapter_path=<run>/round-<k>)` loads any round."""
        folder = self.path / f"round-{k}"
        dist.main_only(folder.mkdir, parents=True, exist_ok=True)
        dist.main_only(mdl.save_adapters, folder, model, lora, base_model)

    def pairs_fingerprint(self) -> str | None:
        """A hash of pairs.jsonl as it is now: a checkpoint records what it trained on."""
        path = self.path / "pairs.jsonl"
        if not path.is_file():
            return None
        return fingerprint(path.read_bytes())

    def save_checkpoint(self, state: ckpt.TrainState) -> None:
        dist.main_only(lambda: ckpt.save(self.path, state, self.pairs_fingerprint()))

    def load_checkpoint(self) -> ckpt.TrainState | None:
        return ckpt.load_on_every_rank(self.path, self.pairs_fingerprint)
