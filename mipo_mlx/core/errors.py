"""How a run ends early: errors a user can cause, and stop requests.

A `UserError` carries one line that names the input (file, line, key) and what
to do. Command-line entry points turn it into that line on stderr and exit
status 2, with no traceback; anything else is a bug: one line names the file in the
system temp folder that keeps its traceback, and the exit status is 1.
A first SIGINT/SIGTERM sets a `StopFlag`; the stage in hand stops at its next safe
point (finished work saved) by raising `Stopped` (exit status 130). Before a stage
installs its flag, the signal ends the command with one line, never a traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_INTERNAL = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
COMMANDS = ("mipo_mlx.train", "mipo_mlx.evaluate", "mipo_mlx.export")
SCRIPTS = ("mipo-train",)  # the console scripts pyproject.toml installs
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
    (0 when generation was stopped); `where` says when, for the one line that reports it."""

    def __init__(self, step: int, where: str = ""):
        self.step = step
        self.where = where or (f"after step {step}" if step else "during generation")
        super().__init__(f"stopped {self.where}")


def in_main_thread() -> bool:
    """Signal handlers can be set only here (signal.signal raises in any other thread)."""
    return threading.current_thread() is threading.main_thread()


class StopFlag:
    """Set by the first SIGINT/SIGTERM; work stops at the next safe point. A second signal
    interrupts. Outside the main thread (the Python API called from a worker thread) no
    handler is installed: the caller's own signal handling stays as it is."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def check(self, where: str) -> None:
        """Raise Stopped (0 steps, `where`) when a stop was requested."""
        if self.requested:
            raise Stopped(0, where)

    @contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print(
                f"\n{signal.Signals(signum).name}: stopping at the next safe point, finished "
                "work saved (send again to stop at once)",
                flush=True,
            )

        with handling(handler):
            yield self


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _end_at_once(signum, frame):
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def quiet_start_up() -> None:
    """In a command's own process (`python -m mipo_mlx.<command>`, `mipo-train`), while the
    package and the command's module import: SIGINT/SIGTERM end it at once with one line (no
    traceback; nothing is written before `main` runs, whose wrapper then takes over)."""
    argv = getattr(sys, "orig_argv", [])
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    starting = sys.argv[:1] == ["-m"] and module in COMMANDS  # still locating the module
    if (starting or os.path.basename(sys.argv[0]) in SCRIPTS) and in_main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _end_at_once)


@contextmanager
def handling(handler: Callable) -> Iterator[None]:
    """`handler` for SIGINT and SIGTERM while the block runs, then the handlers before; in any
    thread but the main one (where signal.signal raises) nothing is changed."""
    if not in_main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _interruptible():
    """SIGINT and SIGTERM raise KeyboardInterrupt (until a stage installs its StopFlag)."""
    return handling(_interrupt)


def save_crash(command: str) -> str | None:
    """Write `command` and the exception being handled, with its traceback, to a file in the
    system temp folder; its path, or None where nothing could be written."""
    import tempfile  # here, not at the top: this module loads first in every command
    import time
    import traceback

    name = f"mipo_mlx-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path = os.path.join(tempfile.gettempdir(), name)
    text = f"{command}\n\n{traceback.format_exc()}"
    try:
        with open(path, "x", encoding="utf-8") as fh:
            fh.write(text)
    except OSError:
        return None
    return path


def _last_resort(main: Callable, argv: list[str] | None) -> int:
    """An exception no check caught: one line naming the file that holds its traceback."""
    err = sys.exc_info()[1]
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)  # __main__ under -m
    prog = spec.name if spec is not None else main.__module__
    path = save_crash(" ".join(["python -m", prog, *(sys.argv[1:] if argv is None else argv)]))
    if path is None:  # nowhere to save it: the traceback itself, rather than nothing
        import traceback

        traceback.print_exc()
        return EXIT_INTERNAL
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    print(
        f"error: internal error in {prog} ({type(err).__name__}{': ' * bool(first)}{first}); "
        f"the full traceback is in {path}: please report it with that file",
        file=sys.stderr,
    )
    return EXIT_INTERNAL


def reports_user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI `main`: user errors end as one line and exit status 2; a stop or an interrupt
    as one line and 130; anything else (a bug) as one line naming the file that keeps its
    traceback, and exit status 1."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            with _interruptible():
                return main(argv) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        except OSError as err:
            if err.errno not in DISK_FAULTS:
                return _last_resort(main, argv)
            where = f"{err.filename}: " if err.filename else ""
            strerror = err.strerror or os.strerror(err.errno)
            print(f"error: {where}{strerror} - {DISK_FAULTS[err.errno]}", file=sys.stderr)
            return EXIT_USER_ERROR
        except Stopped as stop:
            print(f"stopped {stop.where}; finished work is saved", file=sys.stderr)
            return EXIT_INTERRUPTED
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception:
            return _last_resort(main, argv)

    return wrapped
