"""Where prompt rows come from: a local .jsonl file, a .json file (a list of rows, or JSON lines), a
.parquet file (needs pyarrow), a folder of those, or a Hugging Face dataset id (org/name)
fetched with `huggingface_hub.snapshot_download`; each row read as its format says (formats.py)."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

from ..core import reading
from ..core.errors import UserError
from ..core.files import read_jsonl
from .formats import Row, _format_parser, normalize_row

EXTENSIONS = (".jsonl", ".json", ".parquet")


METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """A .json file: a list of objects, or JSON lines under a .json name."""
    if not reading.starts_with(path, "dataset", b"["):
        yield from ((f"{path}:{n}", row) for n, row in read_jsonl(path, "dataset"))
        return
    data = reading.read_json(path, "dataset")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {number} of the list is not a JSON object")
        yield f"{path}: row {number}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow; pip install pyarrow") from None
    os.close(reading.open_file(path, "dataset"))  # a FIFO or device would block pyarrow
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own error types for a broken file
        raise UserError(f"{path}: not a readable parquet file ({err}); re-download it") from None
    for number, row in enumerate(rows, start=1):
        yield f"{path}: row {number}", row


def _file_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, raw record) for each record of one file."""
    if path.suffix == ".jsonl":
        return ((f"{path}:{n}", row) for n, row in read_jsonl(path, "dataset"))
    if path.suffix == ".json":
        return _json_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    raise UserError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")


def _data_files(root: Path) -> list[Path]:
    if not root.is_dir():  # a file, or something posing as one: the reader tells which
        return [root]
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in EXTENSIONS
        and p.name not in METADATA_FILES
        and ".cache" not in p.relative_to(root).parts
    )


def _download(repo_id: str, split: str | None) -> Path:
    from huggingface_hub import snapshot_download

    pattern = f"*{split}*" if split else "*"
    try:
        folder = snapshot_download(
            repo_id, repo_type="dataset", allow_patterns=[pattern + ext for ext in EXTENSIONS]
        )
    except Exception as err:  # network, auth and not-found errors all end the same way
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"{repo_id}: could not download the dataset ({type(err).__name__}: {first}); "
            "check the id and your network, or pass a local file"
        ) from None
    return Path(folder)


def _source_files(source: str, split: str | None) -> list[Path]:
    """The data files of `source` whose path (relative to the source) contains `split`;
    a single file is read as it is (a recipe's split names files of a folder or Hub release)."""
    path = Path(source)
    if path.exists():
        root = path
    elif _HUB_ID.fullmatch(source) and path.suffix not in EXTENSIONS:
        root = _download(source, split)
    else:
        raise UserError(
            f"{source}: file not found; give a .jsonl/.json/.parquet file, "
            "a folder, or a Hugging Face dataset id (org/name)"
        )
    files = _data_files(root)
    if not files:
        raise UserError(f"{source}: no .jsonl, .json or .parquet files found")
    if (
        split is None or not root.is_dir()
    ):  # a file named on its own is read whatever the split says
        return files
    names = {f: f.name if not root.is_dir() else f.relative_to(root).as_posix() for f in files}
    chosen = [f for f in files if split in names[f]]
    if not chosen:
        raise UserError(
            f"{source}: no file name contains split {split!r}; "
            f"files: {', '.join(sorted(names.values()))[:300]}"
        )
    return chosen


def read_rows(
    source: str,
    format: str,
    split: str | None = None,
    limit: int | None = None,
    subset: int | None = None,
    seed: int = 42,
) -> list[Row]:
    """Rows of `source` in `format`: all, then `subset` drawn at random, then the first `limit`.

    `subset` rows are `random.Random(seed).sample` of all rows (the paper: GSM8K
    200 test items, ARC 500, seed 42); `split` keeps the files whose path contains it.
    """
    rows = [row for _, row in read_located(source, format, split)]
    return select(rows, source, subset=subset, seed=seed, limit=limit)


def read_located(source: str, format: str, split: str | None = None) -> list[tuple[str, Row]]:
    """(where, row) for every record of `source`: `where` names its file and line (or row)."""
    _format_parser(format)  # an unknown format fails before any download
    located: list[tuple[str, Row]] = []
    for path in _source_files(source, split):
        for where, raw in _file_rows(path):
            located.append((where, normalize_row(raw, format, where, len(located))))
    return located


def select(
    rows: list,
    source: str,
    skip: int = 0,
    subset: int | None = None,
    seed: int = 42,
    limit: int | None = None,
) -> list:
    """Leave out the first `skip` rows, draw `subset` of the rest at random, keep the first
    `limit`."""
    for name, value in (("limit", limit), ("subset", subset)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not rows:
        raise UserError(f"{source}: no rows found")
    if skip >= len(rows):
        raise UserError(f"{source}: skip={skip} leaves none of its {len(rows)} rows; lower it")
    rows = rows[skip:]
    if subset is not None:
        if subset > len(rows):
            raise UserError(
                f"{source}: subset={subset} but the source has {len(rows)} rows"
                f"{f' after skipping {skip}' if skip else ''}; lower subset or drop it"
            )
        rows = random.Random(seed).sample(rows, subset)
    return rows[:limit] if limit is not None else rows
