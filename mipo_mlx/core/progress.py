"""A progress line with ETA for every stage that can take more than a few seconds.

On a terminal it redraws one line (every second, so the clock moves even while one long
batch runs); when the output is a file or a pipe (CI, `nohup`, `mlx.launch`, which
collects the ranks' output) it writes a plain line at least every `MIPO_MLX_PROGRESS_SECONDS`
(10 by default) while the stage runs, whether or not a step finished: a stage is never
silent for longer, so a slow stage cannot be mistaken for a hung one. MLX releases the
interpreter lock while it computes, so a background thread can print during one long
`mx.eval`.

tqdm (already installed with huggingface_hub) was tried for this: off a terminal it
still writes carriage-return redraws with no newline, so a log file holds one endless
line, and it prints nothing between updates.

Use it as a context manager, so that the background thread always ends with the stage
(an error inside it then prints nothing after its message):

    with Progress(len(batches), "score reference") as progress:
        for batch in batches:
            ...
            progress.update(len(batch))
"""

from __future__ import annotations

import os
import sys
import threading
import time


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def quiet_seconds() -> float:
    """The longest a stage stays silent off a terminal: MIPO_MLX_PROGRESS_SECONDS, else 10."""
    text = os.environ.get("MIPO_MLX_PROGRESS_SECONDS", "")
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    return value if value > 0 else 10.0


class Progress:
    """`stage |#####     | 12/40 [00:10<00:23] loss=0.69` on a terminal; plain lines otherwise.

    A line whenever `every` seconds pass without one (on a terminal, from the start) and the
    last when the stage ends (`close`, or the end of the `with` block); a stage that fails
    leaves no line behind on a terminal, so its error reads alone."""

    def __init__(
        self,
        total: int,
        stage: str,
        stream=None,
        enabled: bool = True,
        every: float | None = None,
    ):
        self.total, self.stage, self.done = max(total, 1), stage, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = every or (1.0 if self.tty else quiet_seconds())
        self.fields: dict[str, str] = {}
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self.start = self.last_print = time.perf_counter()
        if self.tty:  # off a terminal the first line waits `every` seconds: a quick failure
            self._show(self.start)  # then prints its one error line and nothing else
        self._beat = None
        if enabled:
            self._beat = threading.Thread(target=self._heartbeat, name=stage, daemon=True)
            self._beat.start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(finished=kind is None)

    def update(self, n: int = 1, **fields) -> None:
        with self._lock:
            self.done += n
            self.fields.update(
                {k: v if isinstance(v, str) else f"{v:.4g}" for k, v in fields.items()}
            )
            now = time.perf_counter()
            if self.tty or now - self.last_print >= self.every or self.done >= self.total:
                self._show(now)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        eta = _clock(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        filled = int(20 * min(self.done / self.total, 1.0))
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        return (
            f"{self.stage} |{'#' * filled}{' ' * (20 - filled)}| {self.done}/{self.total} "
            f"[{_clock(elapsed)}<{eta}] {extra}"
        ).rstrip()

    def _show(self, now: float) -> None:
        self.last_print = now
        if not self.enabled:
            return
        end = "" if self.tty and self.done < self.total else "\n"
        prefix = "\r\033[K" if self.tty else ""
        print(prefix + self.line(now), end=end, file=self.stream, flush=True)

    def _heartbeat(self) -> None:
        while not self._ended.wait(self.every / 4):
            with self._lock:
                now = time.perf_counter()
                if not self._ended.is_set() and now - self.last_print >= self.every:
                    self._show(now)

    def close(self, finished: bool = True) -> None:
        """End the stage: stop the heartbeat; a finished stage shows its final count and time."""
        with self._lock:
            if self._ended.is_set():
                return
            self._ended.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join()
        with self._lock:
            if finished and self.done < self.total:
                self.done = self.total  # a stage that was quiet (it took under `every`) stays so
                if self.tty or self.last_print > self.start:
                    self._show(time.perf_counter())
            elif self.enabled and self.tty and self.done < self.total:
                print("\r\033[K", end="", file=self.stream, flush=True)  # the error says why
