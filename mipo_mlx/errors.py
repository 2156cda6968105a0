"""How a run ends early: errors a user can cause, and stop requests.

A `UserError` carries one line that names the input (file, line, key) and what
to do. Command-line entry points turn it into that line on stderr and exit
status 2, with no traceback; anything else is a bug and keeps its traceback.
A first SIGINT/SIGTERM sets a `StopFlag`; the stage in hand stops at its next safe
point (finished work saved) by raising `Stopped`.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager

EXIT_USER_ERROR = 2
# Faults of the file system rather than bugs: reported as one line, with what to do.
DISK_FAULTS = {
    errno.ENOSPC: "the disk is full; free space, then resume (what was written is kept)",
    errno.EDQUOT: "the disk quota is used up; free space, then resume",
    errno.EFBIG: "the file grew past the size this process may write; raise the limit, then resume",
    errno.EROFS: "the file system is read-only; choose a writable output folder",
    errno.EACCES: "no permission to write there; choose another output folder",
    errno.EPERM: "no permission to write there; choose another output folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
}


class UserError(Exception):
    """Bad input or environment: reported as one line, exit status 2."""


class Stopped(Exception):
    """A stop was requested; finished work is saved. `step` is the last optimizer step done
    (0 when generation was stopped)."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step


class StopFlag:
    """Set by the first SIGINT/SIGTERM; work stops at the next safe point. A second signal
    interrupts."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    @contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print(
                f"\n{signal.Signals(signum).name}: finishing the current step, "
                "then saving a checkpoint "
                "(send again to stop at once)",
                flush=True,
            )

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def reports_user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI `main` so user errors end as one line and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        except OSError as err:
            if err.errno not in DISK_FAULTS:
                raise
            where = f"{err.filename}: " if err.filename else ""
            strerror = err.strerror or os.strerror(err.errno)
            print(f"error: {where}{strerror} - {DISK_FAULTS[err.errno]}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped
