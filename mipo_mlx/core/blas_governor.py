"""OpenBLAS's thread count, kept to the cores the rest of the machine leaves idle.

One BLAS thread is safe beside other busy processes but leaves cores idle when the machine
is otherwise quiet: on 2 cores the end-to-end benchmark's run took 54 s with one thread and
41 s with two (BENCHMARKS.md). Under the `adapt` policy OpenBLAS loads with a pool of
threads, computes on one, and a daemon thread samples every `PERIOD` seconds how much CPU
the other processes took on this process's cores (the busy time `/proc/stat` counts for
them, less this process's own CPU time, all its threads included). It computes on the cores
left over: fewer at once when another process starts, more only after two samples in a row
found them idle.

Changing the count is a store of one integer in OpenBLAS (the pool is never grown past the
size it loaded with), read by each BLAS call as it starts.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable

PERIOD = 0.5  # seconds between samples
SLACK = 0.3  # a core counts as idle when the others leave at least 0.7 of it
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (guest is in user)


def busy_seconds(stat: str, cpus: Iterable[int], hertz: int) -> float:
    """The busy time of `cpus` so far, in seconds, from the text of /proc/stat."""
    wanted = {f"cpu{c}" for c in cpus}
    total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if name in wanted:
            total += sum(int(fields[i]) for i in BUSY_FIELDS if i < len(fields))
    return total / hertz


def threads_for(others: float, cores: int, most: int) -> int:
    """The threads to compute on when the other processes keep `others` of `cores` busy."""
    free = cores - max(0.0, others)
    return max(1, min(most, int(free + SLACK)))


def next_count(current: int, allowed: list[int]) -> int:
    """The count after a sample: down at once to what the last sample allows; up only to
    what the last two samples both allow."""
    if allowed[-1] <= current or len(allowed) < 2:
        return min(current, allowed[-1])
    return max(current, min(allowed[-2:]))


class Governor:
    """Samples the machine and sets OpenBLAS's thread count; `counts` keeps what it chose."""

    def __init__(
        self,
        set_threads: Callable[[int], None],
        most: int,
        cpus: list[int],
        read_stat: Callable[[], str] = lambda: open("/proc/stat").read(),
        own_seconds: Callable[[], float] = lambda: sum(os.times()[:2]),
        period: float = PERIOD,
    ):
        self.set_threads, self.most, self.cpus = set_threads, most, cpus
        self.read_stat, self.own_seconds, self.period = read_stat, own_seconds, period
        self.hertz = os.sysconf("SC_CLK_TCK")
        self.current = 1
        self.allowed: list[int] = []
        self.counts: list[int] = []  # each sample's choice, for tests and reports
        self._stop = threading.Event()
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        return (
            time.monotonic(),
            busy_seconds(self.read_stat(), self.cpus, self.hertz),
            self.own_seconds(),
        )

    def step(self) -> int:
        """Take one sample and apply what it allows; the count now."""
        now = self._sample()
        wall = now[0] - self._last[0]
        others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / max(wall, 1e-3)
        self._last = now
        self.allowed = [*self.allowed[-1:], threads_for(others, len(self.cpus), self.most)]
        count = next_count(self.current, self.allowed)
        if count != self.current:
            self.set_threads(count)
            self.current = count
        self.counts.append(count)
        return count

    def run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.step()
            except (OSError, ValueError):  # /proc unreadable: stay on what was chosen
                return

    def start(self) -> Governor:
        threading.Thread(target=self.run, name="mipo_mlx-blas-threads", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
