"""What a run wrote at the top of its folder: the only names `output.overwrite` removes.

Before a run creates a file or folder in its folder, it appends the name to `written.jsonl`
there, one JSON line each (a line torn by a kill is dropped, never read as another name).
An overwrite removes the recorded names alone, so a user's files beside them stay. A folder
a run wrote before this record existed gets only the exact names such a run wrote removed
(its config.yaml says how many rounds it had), never a pattern that could match a user's file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from . import reading
from .errors import UserError
from .files import append_jsonl, discard_marked, partial_and_old

RECORD = "written.jsonl"
CONFIG = "config.yaml"  # written first by every run: recorded, it says the record is whole
# A config.yaml a run wrote has every section, and output.dir made absolute
SECTIONS = ("model", "data", "training", "lora", "output")


def _is_name(name) -> bool:
    """A plain entry name of the folder itself: nothing a hand edit could aim elsewhere."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", RECORD)
        and "/" not in name
        and "\0" not in name
        and os.sep not in name
    )


def recorded(folder: Path) -> set[str]:
    """The names the record in `folder` holds (none if it has no record)."""
    path = folder / RECORD
    if not path.is_file():
        return set()
    names = set()
    for number, row in enumerate(reading.appended_values(path, "record"), start=1):
        if not (isinstance(row, dict) and _is_name(row.get("name"))):
            raise UserError(
                f"{path}: entry {number} is not a name a run wrote; restore the file, or clear "
                "the folder by hand and start again"
            )
        names.add(row["name"])
    return names


def _legacy(folder: Path, run_names: Callable[[int], set[str]]) -> set[str]:
    """The exact names a run that kept no record wrote, if config.yaml is such a run's."""
    try:
        saved = reading.parse_yaml(reading.read_text(folder / CONFIG, "config"), CONFIG)
    except UserError:
        return set()
    if not (isinstance(saved, dict) and all(isinstance(saved.get(s), dict) for s in SECTIONS)):
        return set()
    where = saved["output"].get("dir")
    if not (isinstance(where, str) and Path(where).is_absolute()):  # a recipe, not a run's copy
        return set()
    rounds = saved["training"].get("rounds", 1)
    return run_names(rounds if type(rounds) is int and 1 <= rounds <= 1000 else 1)


def owned(folder: Path, run_names: Callable[[int], set[str]]) -> set[str]:
    """The names of `folder` that earlier runs wrote: the recorded ones, with those of a run
    from before the record existed (config.yaml there and not recorded)."""
    names = recorded(folder)
    if CONFIG not in names:
        names |= _legacy(folder, run_names)
    if (folder / RECORD).is_file():
        names.add(RECORD)
    return names


def remove(folder: Path, names: set[str]) -> None:
    """Remove the entries `names` of `folder` (a link itself, never what it points to), with
    the temporary folders `files.atomic_folder` left beside them."""
    for name in sorted(names):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        for leftover in partial_and_old(path):
            discard_marked(leftover)


class Record:
    """The record of the folder a run writes; `add` a name before creating it (the first add
    makes the folder itself, if it is not there yet)."""

    def __init__(self, folder: Path):
        self.folder, self.names = folder, None

    def add(self, *names: str) -> None:
        if self.names is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.names = recorded(self.folder)
        for name in names:
            if name not in self.names:
                append_jsonl(self.folder / RECORD, {"name": name})
                self.names.add(name)
