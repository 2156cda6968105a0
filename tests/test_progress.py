"""Progress: no stage is silent for long, on a terminal or off it, and none prints after it
fails.

Time here is a fake clock's (`FakeClock`): a test says "13 s pass" and sees at once exactly
the lines those seconds print, on any machine however loaded; nothing sleeps."""

from __future__ import annotations

import importlib
import io
import json
import math
import sys
import threading
import time

import pytest

from mipo_mlx.core.progress import Progress


class Pipe(io.StringIO):
    """A stream off a terminal (a log file, CI)."""

    def isatty(self) -> bool:
        return False


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    """The time of mipo_mlx.core.progress: its `time` (perf_counter, monotonic) and the waits
    of its heartbeat thread (`threading.Event`), moved only by `advance`.

    `advance(seconds)` wakes each heartbeat wait that falls due, in time order, and lets that
    thread run until it waits again (or ends) before it moves on: what a heartbeat prints in
    those seconds is printed, at the time it would be, before `advance` returns."""

    def __init__(self) -> None:
        self.now = 0.0
        self.cond = threading.Condition()
        self.sleeping: dict[object, tuple[float, threading.Thread]] = {}  # wait -> (due, thread)
        self.running: set[threading.Thread] = set()  # started or woken, not waiting yet
        clock = self

        class Thread(threading.Thread):
            def start(self) -> None:
                with clock.cond:
                    clock.running.add(self)
                super().start()

            def run(self) -> None:
                try:
                    super().run()
                finally:
                    with clock.cond:
                        clock.running.discard(self)
                        clock.cond.notify_all()

        self.time = Module(time, perf_counter=self.read, monotonic=self.read, time=self.read)
        self.threading = Module(threading, Event=lambda: FakeEvent(self), Thread=Thread)

    def read(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self.cond:
            end = self.now + seconds
            while True:
                if not self.cond.wait_for(lambda: not self.running, timeout=60):  # a hang
                    raise AssertionError(f"heartbeat threads never waited again: {self.running}")
                due = [when for when, _ in self.sleeping.values() if when <= end]
                if not due:
                    break
                self.now = max(self.now, min(due))
                for wait, (when, thread) in list(self.sleeping.items()):
                    if when <= self.now:
                        del self.sleeping[wait]
                        self.running.add(thread)
                self.cond.notify_all()
            self.now = end


class Module:
    """A module with some of its names replaced."""

    def __init__(self, real, **names) -> None:
        self._real = real
        self.__dict__.update(names)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


class FakeEvent:
    """threading.Event whose `wait(timeout)` times out by the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.flag = clock, False

    def is_set(self) -> bool:
        return self.flag

    def set(self) -> None:
        with self.clock.cond:
            self.flag = True
            self.clock.cond.notify_all()

    def clear(self) -> None:
        self.flag = False

    def wait(self, timeout: float | None = None) -> bool:
        clock, me = self.clock, threading.current_thread()
        with clock.cond:
            clock.running.discard(me)
            clock.cond.notify_all()
            if self.flag:
                return True
            wait = object()
            clock.sleeping[wait] = (clock.now + (math.inf if timeout is None else timeout), me)
            clock.cond.wait_for(lambda: self.flag or wait not in clock.sleeping)
            clock.sleeping.pop(wait, None)  # there still when set() woke it
            return self.flag


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """A fake clock for mipo_mlx.core.progress, wherever the package keeps that module."""
    fake = FakeClock()
    module = sys.modules[Progress.__module__]
    monkeypatch.setattr(module, "time", fake.time)
    monkeypatch.setattr(module, "threading", fake.threading)
    return fake


def test_a_long_step_still_prints_off_a_terminal(clock):
    out = Pipe()
    with Progress(2, "score", stream=out, every=4) as progress:
        clock.advance(13)  # one long batch: no update for 13 s
        progress.update()
        progress.update()
    assert out.getvalue().splitlines() == [  # the ETA is unknown before the first step
        "score |                    | 0/2 [00:04<?]",
        "score |                    | 0/2 [00:08<?]",
        "score |                    | 0/2 [00:12<?]",
        "score |####################| 2/2 [00:13<00:00]",
    ]


def test_a_quick_stage_is_quiet_and_a_failed_one_prints_nothing_after(clock):
    out = Pipe()
    with Progress(1, "load", stream=out, every=5):
        clock.advance(4.5)
    assert out.getvalue() == ""
    threads = threading.active_count()
    with pytest.raises(ValueError):
        with Progress(3, "train", stream=out, every=1):
            clock.advance(2.5)
            raise ValueError("bad batch")
    printed = out.getvalue()
    assert printed.splitlines() == [
        "train |                    | 0/3 [00:01<?]",
        "train |                    | 0/3 [00:02<?]",
    ]
    clock.advance(10)
    assert out.getvalue() == printed  # the heartbeat ended with it
    assert threading.active_count() == threads


def test_terminal_line_redraws_and_is_erased_on_failure(clock):
    out = Terminal()
    with pytest.raises(KeyboardInterrupt):
        with Progress(4, "generate", stream=out) as progress:
            progress.update()
            clock.advance(2.5)  # redrawn every second: the clock moves during a long batch
            raise KeyboardInterrupt
    text = out.getvalue()
    assert text.startswith("\r\033[Kgenerate |") and "1/4 [00:02<00:06]" in text
    assert text.endswith("\r\033[K") and "\n" not in text  # the interrupted line is cleared


# The stand-in slow machine: every forward pass takes DELAY seconds of the fake clock and a
# model load 5 * DELAY, so each stage takes as long as it would with a model hundreds of times
# larger, while the program stays the same. With MIPO_MLX_PROGRESS_SECONDS=EVERY, no stage may
# be silent for longer than QUIET. Before the heartbeat, loading the model (2.5 s) and the PMI
# scoring (several forward passes) printed nothing for longer.
DELAY, EVERY, QUIET = 0.5, 0.5, 0.5


class Output(io.TextIOBase):
    """stdout and stderr on one pipe (off a terminal): each line with the clock's time."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.lines, self.times, self.partial = clock, [], [], ""

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        *ended, self.partial = (self.partial + text).split("\n")
        self.lines += ended
        self.times += [self.clock.now] * len(ended)
        return len(text)


@pytest.fixture
def slow_machine(clock, monkeypatch) -> Output:
    """Loads and forward passes of mlx-lm models take the fake clock's time; an output that
    times each line."""
    import mlx_lm

    real_load, slowed = mlx_lm.load, set()

    def slow_load(*args, **kwargs):
        clock.advance(5 * DELAY)
        loaded = real_load(*args, **kwargs)
        kind = type(loaded[0])
        if kind not in slowed:
            call = kind.__call__

            def slow_call(self, *a, **k):
                clock.advance(DELAY)
                return call(self, *a, **k)

            monkeypatch.setattr(kind, "__call__", slow_call)
            slowed.add(kind)
        return loaded

    monkeypatch.setattr(mlx_lm, "load", slow_load)
    monkeypatch.setenv("MIPO_MLX_PROGRESS_SECONDS", str(EVERY))
    return Output(clock)


def test_no_stage_is_silent_on_a_slow_machine(toy_model_dir, tmp_path, slow_machine, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", slow_machine)  # here: pytest sets its own at each phase
    monkeypatch.setattr(sys, "stderr", slow_machine)
    rows = [{"prompt": f"Tom has {i} apples. How many?", "answer": str(i)} for i in range(4)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = [
        "train",
        "--model",
        str(toy_model_dir),
        "--prompts",
        "p.jsonl",
        "--evaluation.prompts",
        "p.jsonl",
        "--output",
        "run",
        "--iters",
        "2",
        "--generation.max_tokens",
        "3",
        "--evaluation.max_tokens",
        "3",
        "--generation.truncated",
        "keep",
        "--evaluation.plots",
        "false",
    ]
    evaluate = ["evaluate", "--adapters", "run", "--output", "ev", "--evaluation.plots", "false"]
    export = ["export", "--adapters", "run", "--output", "fused"]
    seen = []
    for command in (train, evaluate, export):  # each command's main(argv), in this process
        first = len(slow_machine.lines)
        code = importlib.import_module(f"mipo_mlx.{command[0]}").main(command[1:])
        lines, times = slow_machine.lines[first:], slow_machine.times[first:]
        assert code == 0, "\n".join(lines[-20:])
        longest = max((b - a for a, b in zip(times, times[1:])), default=0.0)
        assert longest <= QUIET, (command[0], longest, list(zip(times, lines)))
        seen += lines
    stages = {line.split(" |")[0] for line in seen if " |" in line}
    for stage in ("load", "answer (base)", "PMI (base)", "generate chosen", "score reference"):
        assert any(s.startswith(stage) for s in stages), (stage, stages)
    assert {"train", "PMI (mipo)", "fuse and check"} <= stages, stages
