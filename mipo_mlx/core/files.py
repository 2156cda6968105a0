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

from . import reading
from .errors import UserError

# The mark of the package's own temporary names: a hidden name with this in it, and (for
# folders) a file of this name inside. Anything without both is the user's and is never removed.
MARK = ".mipo_mlx"
_MARK_TEXT = "a folder mipo_mlx is writing or replacing; mipo_mlx removes it\n"


def ours(target: Path) -> str:
    """The start of every name the package keeps beside `target` (temporary files and folders,
    backups, a lock): hidden, and marked as its own."""
    return f".{target.name}{MARK}"


@contextmanager
def atomic_path(target: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` on success.

    `suffix` ends the temporary name (writers that add their own extension need it). The
    temporary name is new (mkstemp), so only the file this call made is ever removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{ours(target)}.", suffix=suffix, dir=target.parent)
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
    """The names `atomic_folder` writes into and moves the previous folder aside to: hidden,
    and marked as the package's (a user's `<target>.old` is another name)."""
    hidden = ours(target)
    return target.with_name(f"{hidden}.partial"), target.with_name(f"{hidden}.old")


def is_marked(folder: Path) -> bool:
    """Whether `folder` is a real folder (not a link) that `atomic_folder` marked as its own."""
    return folder.is_dir() and not folder.is_symlink() and (folder / MARK).is_file()


def _check_ours(folder: Path) -> None:
    """At a temporary name, only the package's folder: marked, or left empty by a kill before
    its mark was written. Anything else there is the user's: one line."""
    empty = folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())
    if os.path.lexists(folder) and not (is_marked(folder) or empty):
        raise UserError(
            f"{folder}: not a folder mipo_mlx wrote, in a name it uses for its temporary "
            "folders; move it away"
        )


def discard_marked(folder: Path) -> None:
    """Remove `folder` if it is the package's temporary folder (`_check_ours`)."""
    _check_ours(folder)
    if os.path.lexists(folder):
        shutil.rmtree(folder)


def _mark(folder: Path) -> None:
    (folder / MARK).write_text(_MARK_TEXT, encoding="utf-8")


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `target` to fill; on success it replaces `target`.

    The previous folder is marked and moved aside to the `.old` name before the new one is
    renamed into place, and deleted after, so a kill at any instant leaves a whole folder at
    `target` or at the `.old` name (`newest_folder` finds it). A failure while filling
    leaves `target` as it was. Only folders carrying the package's mark are removed."""
    target = Path(target)
    partial, old = partial_and_old(target)
    _check_ours(old)  # before anything is written: it is removed once the new one is in place
    discard_marked(partial)
    partial.mkdir(parents=True)
    try:
        _mark(partial)
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        discard_marked(old)
        _mark(target)  # the caller replaces it: a kill after the move leaves it removable
        target.rename(old)
    partial.rename(target)
    discard_marked(old)
    (target / MARK).unlink(missing_ok=True)  # a whole folder now, no longer temporary


def newest_folder(target: str | Path) -> Path | None:
    """`target`, or the marked `.old` copy a kill between `atomic_folder`'s two renames left;
    None if neither."""
    target = Path(target)
    if target.is_dir():
        return target
    old = partial_and_old(target)[1]
    return old if is_marked(old) else None


def check_output_place(out: Path, given: str, what: str, model: str | None = None) -> None:
    """Refuse an output folder whose files would mix with others': none given (which means
    the working directory), the working directory itself, and the local model folder, a folder
    inside it or one holding it."""
    if not str(given).strip():
        raise UserError(f"{what} is empty (the working directory); name a folder of its own")
    place = Path(out).expanduser().resolve()
    if place == Path.cwd().resolve():
        raise UserError(f"{what} {given}: is the working directory; name a folder of its own")
    base = Path(model).expanduser() if model else None
    if base is None or not base.is_dir():
        return
    base = base.resolve()
    if place == base or base in place.parents or place in base.parents:
        where = "is" if place == base else "is inside" if base in place.parents else "holds"
        raise UserError(
            f"{what} {given}: {where} the model folder {model}; choose a folder outside it"
        )


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
    """Yield (line number, object) for each non-blank line; bad lines are user errors
    (`reading` checks the file and each line).

    A missing file, or one that is no regular file, is reported at the call, not at the first
    iteration."""
    os.close(reading.open_file(path, what))
    return reading.jsonl_rows(path, what)


def read_lines(path: Path) -> list:
    """Whole JSON lines of a file being appended to; a torn last line (a kill mid-write) is
    dropped."""
    if not path.exists():
        return []
    return reading.appended_values(path, "stage")


LOCK_NAME = f"{MARK}.lock"  # the package's own name: a user's `.lock` is never taken or removed


def _take(path: Path, folder: Path, what: str):
    """The open lock file `path`, flock-ed; one line naming the holder if another has it."""
    import fcntl

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
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def _missing(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextmanager
def folder_lock(folder: str | Path, what: str = "output.dir", replaced: bool = False):
    """Hold an exclusive lock on `folder` (created if missing) while the block runs.

    A second process that asks for it gets one line naming the holder. The lock is the
    operating system's (flock), so a killed holder releases it at once. The lock file goes
    when the block ends, and so do the folders this created and left holding nothing else.
    With `replaced` (a folder `atomic_folder` replaces whole, which a lock file inside would
    leave with), the lock file lies beside it, `.<name>.mipo_mlx.lock`, and `folder` is not
    created."""
    import socket
    import sys
    import time

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder; choose another {what}")
    home = folder.parent if replaced else folder
    path = home / (f"{ours(folder)}.lock" if replaced else LOCK_NAME)
    created = _missing(home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        handle = _take(path, folder, what)
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
        for made in created:
            if not made.is_dir() or any(made.iterdir()):
                break
            made.rmdir()
