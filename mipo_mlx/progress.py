"""A progress line with ETA for every long stage (generation, scoring, training).

On a terminal it redraws one line; when the output is a file or a pipe (CI, `nohup`,
`mlx.launch`, which collects the ranks' output) it writes a plain line every ~10 s.
tqdm (already installed with huggingface_hub) was tried for this: off a terminal it
still writes carriage-return redraws with no newline, so a log file holds one endless
line. These 50 lines keep the log readable.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """`stage |#####     | 12/40 [00:10<00:23] loss=0.69` on a terminal; plain lines otherwise."""

    def __init__(
        self, total: int, stage: str, stream=None, enabled: bool = True, every: float = 10.0
    ):
        self.total, self.stage, self.done = max(total, 1), stage, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last_print = time.perf_counter()
        self.every = every  # seconds between plain lines when not on a terminal
        self.fields: dict[str, str] = {}

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields.update({k: v if isinstance(v, str) else f"{v:.4g}" for k, v in fields.items()})
        now = time.perf_counter()
        if self.tty or now - self.last_print >= self.every or self.done >= self.total:
            self.last_print = now
            self._show(now)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        filled = int(20 * min(self.done / self.total, 1.0))
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        return (
            f"{self.stage} |{'#' * filled}{' ' * (20 - filled)}| {self.done}/{self.total} "
            f"[{_clock(elapsed)}<{_clock(eta)}] {extra}"
        ).rstrip()

    def _show(self, now: float) -> None:
        if not self.enabled:
            return
        end = "" if self.tty and self.done < self.total else "\n"
        prefix = "\r\033[K" if self.tty else ""
        print(prefix + self.line(now), end=end, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self.done < self.total:
            print(file=self.stream)
