"""Reading and writing files: atomic replaces of files and folders, and checked JSONL.

Every artifact is written to a temporary file (or folder) beside its target and
renamed over it, so a kill at any instant leaves the old one or the new one,
never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError


@contextmanager
def atomic_path(target: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` on success.

    `suffix` ends the temporary name (writers that add their own extension need it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:  # the rename must not overtake the data
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def partial_and_old(target: Path) -> tuple[Path, Path]:
    """The names `atomic_folder` writes into and moves the previous folder aside to."""
    return target.with_name(f"{target.name}.partial"), target.with_name(f"{target.name}.old")


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `target` to fill; on success it replaces `target`.

    The previous folder is moved aside to `<target>.old` before the new one is renamed
    into place and deleted after, so a kill at any instant leaves a whole folder at
    `target` or at `<target>.old` (`newest_folder` finds it). A failure while filling
    leaves `target` as it was."""
    target = Path(target)
    partial, old = partial_and_old(target)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    partial.rename(target)
    if old.exists():
        shutil.rmtree(old)


def newest_folder(target: str | Path) -> Path | None:
    """`target`, or the `.old` copy a kill between `atomic_folder`'s two renames left; None if
    neither."""
    target = Path(target)
    for folder in (target, partial_and_old(target)[1]):
        if folder.is_dir():
            return folder
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(target: str | Path, rows: Iterable[dict]) -> None:
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def append_jsonl(target: str | Path, row: dict) -> None:
    """Append one line with a single write, so a reader sees whole lines or none."""
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path, what: str = "rows") -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; bad lines are user errors.

    A missing file is reported at the call, not at the first iteration."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    return _rows(path)


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(
                    f"{path}:{number}: not UTF-8 text; re-save the file as UTF-8"
                ) from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line"
                ) from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: each line must be a JSON object")
            yield number, row


def read_lines(path: Path) -> list[dict]:
    """Whole JSON lines of a file being appended to; a torn last line (a kill mid-write) is
    dropped."""
    if not path.is_file():
        return []
    rows = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number < len(lines) - 1:  # only the last line may be torn
                raise UserError(
                    f"{path}:{number}: corrupt line; delete the file to redo this stage"
                ) from None
    return rows


LOCK_NAME = ".lock"


@contextmanager
def folder_lock(folder: str | Path, what: str = "output.dir") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if missing) while the block runs.

    A second process that asks for it gets one line naming the holder. The lock is the
    operating system's (flock), so a killed holder releases it at once. The lock file goes
    when the block ends, and so does a folder this created and left holding nothing else."""
    import fcntl
    import socket
    import sys
    import time

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder; choose another {what}")
    created = not folder.exists()
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise UserError(
                    f"{folder}: in use by {holder}; wait for it to finish or choose another {what}"
                ) from None
            try:  # the holder before may have removed the file between our open and lock
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
    except OSError as e:
        raise UserError(
            f"{folder}: cannot write there ({e.strerror}); choose another {what}"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"
        host, started = socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"process {os.getpid()} on {host} (mipo_mlx.{name}, since {started})")
        handle.flush()
        yield folder
    finally:
        path.unlink(missing_ok=True)  # while still held: the next holder makes a new one
        handle.close()
        if created and not any(folder.iterdir()):
            folder.rmdir()
