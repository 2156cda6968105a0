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
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..core import reading, written
from ..core.config import Config, LoraConfig, to_dict, to_yaml
from ..core.errors import UserError
from ..core.files import (
    append_jsonl,
    check_output_place,
    folder_lock,
    read_jsonl,
    read_lines,
    write_json,
    write_jsonl,
    write_text,
)
from ..data.pair_file import Pair, are_token_ids, pair_from_row, write_pairs
from ..data.prompts import Prompt, prompt_row
from ..engine import distributed as dist
from ..engine import train_state as ckpt
from ..engine.generation import Response
from ..engine.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapters
from . import run_record
from .trackers import TRACKERS, tracker_files

# Files of the stages a rerun reuses; an overwrite clears them. With the final outputs, they mark
# a run.
STAGE_FILES = (
    "inputs.json",
    run_record.RECORD,
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
# What else a run may write at the top of its folder (`run_names` adds the rounds')
OUTPUT_FILES = (
    ADAPTER_CONFIG,
    "eval.md",
    "eval.png",
    "training.png",
    written.RECORD,
    *(name for tracker in TRACKERS.values() for name in tracker.files),
)
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


def settings(config: Config) -> dict:
    """`config` as flat dotted settings, local paths absolute (as config.yaml keeps them)."""
    return _flat(to_dict(portable(config)))


def evaluation_made_with(flat: dict, heldout: str | None) -> dict:
    """The evaluation settings and held-out prompts that evaluation results are made with."""
    return {
        **{
            k: v for k, v in flat.items() if k.startswith("evaluation.") and k != "evaluation.plots"
        },
        "heldout_prompts": heldout,
    }


def check_same_run(out: Path, config: Config) -> None:
    """Resuming into `out` needs the settings and the model it was started with (those in
    `MAY_CHANGE` may differ): held to its record, not to config.yaml, which users edit."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"{out}: no config.yaml, so no run to resume; start it without --resume")
    record = run_record.read(out / run_record.RECORD)
    if record is None:  # started before runs kept a record: config.yaml is all there is
        text = reading.read_text(saved_path, "config")
        record = {"settings": _flat(reading.parse_yaml(text, str(saved_path)) or {})}
    run_record.check(out, record, settings(config))


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
    saved = reading.read_json_or_none(path, "inputs")
    if not isinstance(saved, dict):
        raise UserError(f"{path}: damaged; start the run again in a new output.dir")
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
    check_output_place(out, config.output.dir, "output.dir", config.model.path)
    owned = written.owned(out, run_names)
    foreign = [n for n in sorted(run_names(config.training.rounds) - owned) if _there(out, n)]
    if foreign:
        raise UserError(
            f"{out}: holds {', '.join(foreign)}, which no run of mipo_mlx wrote there and this "
            "run would write; move them away or choose another output.dir"
        )
    # A record alone (a run stopped before its first file) is no earlier run: it starts anew
    earlier = [name for name in sorted(owned - {written.RECORD}) if _there(out, name)]
    if earlier and not config.output.overwrite:
        raise UserError(
            f"{out}: holds an earlier run ({', '.join(earlier)}); choose another "
            "output.dir or pass --output.overwrite true"
        )


def run_names(rounds: int) -> set[str]:
    """The names at the top of its folder that a run of `rounds` rounds may write."""
    names = {*RUN_FILES, *OUTPUT_FILES}
    for k in range(1, rounds + 1):
        names |= {f"eval_round-{k}.json", f"guard_round-{k}.json"}
        names |= {f"round-{k}"} if rounds > 1 else set()
    return names


def _there(folder: Path, name: str) -> bool:
    return os.path.lexists(folder / name)


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
        self.written = written.Record(self.path)  # rank 0's: only it writes

    def _write(self, names: tuple[str, ...], write: Callable, *args, **kwargs) -> None:
        """Record `names` (rank 0), then write them: an overwrite removes only recorded names."""
        dist.main_only(self.written.add, *names)
        dist.main_only(write, *args, **kwargs)

    def round(self, k: int) -> RunFolder:
        """Round k's folder: the run folder for round 1, its `round-<k>/` for later rounds."""
        if k == 1:
            return self
        folder = RunFolder(self.path / f"round-{k}")
        self._write((folder.path.name,), folder.path.mkdir, parents=True, exist_ok=True)
        return folder

    def check(self, config: Config, resume: bool) -> None:
        dist.main_only(check_run_folder, self.path, config, resume)

    def locked(self) -> contextlib.AbstractContextManager:
        """The run holds its folder for as long as it runs (the main rank locks it): a second
        run on it stops with one line naming the holder, before it reads or writes anything."""
        return folder_lock(self.path) if dist.is_main() else contextlib.nullcontext()

    def start(self, config: Config) -> None:
        """Create the folder and write config.yaml; with overwrite, first remove what earlier
        runs recorded writing there (and nothing else)."""
        dist.main_only(self._start, config)

    def _start(self, config: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        written.remove(self.path, written.owned(self.path, run_names))  # overwrite was asked for
        self.written = written.Record(self.path)
        # Written by the stages that follow, through other modules: recorded here, before them
        e = config.evaluation
        later = ["guard.json"] if config.guard.prompts else []
        later += ["eval.json", "eval.md"] if e.prompts else []
        later += ["eval.png", "training.png"] if e.prompts and e.plots else []
        later += tracker_files(config.training.report_to)  # an earlier run's curves go
        self.written.add(written.CONFIG, run_record.RECORD, *later)
        write_text(self.path / written.CONFIG, to_yaml(portable(config)))

    def check_inputs(self, inputs: dict[str, str]) -> None:
        dist.main_only(check_inputs, self.path, inputs)

    def keep_inputs(self, inputs: dict[str, str]) -> None:
        self._write((INPUTS,), write_json, self.path / INPUTS, inputs)

    def keep_record(self, config: Config, heldout: str | None) -> None:
        """What defines the run (`run_record`), written as it starts; `heldout` fingerprints
        the held-out prompts the evaluation answers."""
        now = settings(config)
        record = run_record.make(now, evaluation_made_with(now, heldout))
        dist.main_only(write_json, self.path / run_record.RECORD, record)

    def refresh_evaluation(self, config: Config, heldout: str | None) -> bool:
        """A resume whose evaluation settings or held-out prompts differ from those its cached
        evaluation results were made with drops those results (made again, base included, so
        before and after compare alike) and records the new ones; returns whether it did."""
        path = self.path / run_record.RECORD
        now = evaluation_made_with(settings(config), heldout)

        def refresh() -> bool:
            record = run_record.read(path)
            if record is None or record.get("evaluation") == now:
                return False
            stale = re.compile(r"eval_base\.json|eval_round-\d+\.json")
            for name in filter(stale.fullmatch, written.recorded(self.path)):  # ours alone
                (self.path / name).unlink(missing_ok=True)
            write_json(path, {**record, "evaluation": now})
            return True

        return dist.decided(refresh)

    def keep_prompts(self, name: str, prompts: list[Prompt]) -> None:
        """Prompts read from a public dataset, as this project's JSONL (inspectable, and usable
        as data.prompts or evaluation.prompts of a later run)."""
        self._write((name,), write_jsonl, self.path / name, map(prompt_row, prompts))

    def responses(self, name: str, vocab: int | None = None) -> ResponseFile:
        """The file of a generation pass, recorded before its first line."""
        path = self.path / f"responses.{name}.jsonl"
        dist.main_only(self.written.add, path.name)
        return ResponseFile(path, vocab)

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
        self._write(("pairs.jsonl",), write_pairs, self.path / "pairs.jsonl", pairs)

    def cached_json(self, name: str, compute: Callable[[], dict]) -> dict:
        """The JSON file `name` if an earlier attempt wrote it, else `compute()` (run on every
        rank: it may hold collectives) written there."""
        path = self.path / name
        value = dist.decided(lambda: reading.read_json(path, "stage") if path.is_file() else None)
        if value is None:
            value = compute()
            self._write((name,), write_json, path, value)
        return value

    def append_metrics(self, row: dict) -> None:
        self._write(("metrics.jsonl",), append_jsonl, self.path / "metrics.jsonl", row)

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
        names = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
        self._write(names, save_adapters, self.path, model, lora, base_model)
        if step is not None:
            copy = f"{step:07d}_adapters.safetensors"
            self._write((copy,), save_adapters, self.path, model, lora, base_model, name=copy)

    def round_adapters(self, k: int, model, lora: LoraConfig, base_model: str) -> None:
        """Round k's adapters of a run of several rounds, kept in `round-<k>/` (round 1's too):
        `mlx_lm.load(model, adapter_path=<run>/round-<k>)` loads any round."""
        folder = self.path / f"round-{k}"
        self._write((folder.name,), folder.mkdir, parents=True, exist_ok=True)
        dist.main_only(save_adapters, folder, model, lora, base_model)

    def pairs_fingerprint(self) -> str | None:
        """A hash of pairs.jsonl as it is now: a checkpoint records what it trained on."""
        path = self.path / "pairs.jsonl"
        if not path.is_file():
            return None
        return fingerprint(path.read_bytes())

    def save_checkpoint(self, state: ckpt.TrainState) -> None:
        def save() -> None:  # the pairs are rank 0's to read
            ckpt.save(self.path, state, self.pairs_fingerprint())

        self._write((ckpt.NAME,), save)

    def load_checkpoint(self) -> ckpt.TrainState | None:
        return ckpt.load_on_every_rank(self.path, self.pairs_fingerprint)
