"""Progress: no stage is silent for long, on a terminal or off it, and none prints after it
fails."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mipo_mlx.core.progress import Progress

HERE = Path(__file__).resolve().parent


class Pipe(io.StringIO):
    """A stream off a terminal (a log file, CI)."""

    def isatty(self) -> bool:
        return False


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_step_still_prints_off_a_terminal():
    out = Pipe()
    with Progress(2, "score", stream=out, every=0.2) as progress:
        time.sleep(0.7)  # one long batch: no update for 0.7 s
        progress.update()
        progress.update()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.startswith("score |") for line in lines), lines
    assert "0/2 [00:00<?]" in lines[0]  # the ETA is unknown before the first step
    assert lines[-1].startswith("score |####################| 2/2")


def test_a_quick_stage_is_quiet_and_a_failed_one_prints_nothing_after():
    out = Pipe()
    with Progress(1, "load", stream=out, every=5):
        pass
    assert out.getvalue() == ""
    threads = threading.active_count()
    with pytest.raises(ValueError):
        with Progress(3, "train", stream=out, every=0.1):
            time.sleep(0.25)
            raise ValueError("bad batch")
    printed = out.getvalue()
    time.sleep(0.3)
    assert out.getvalue() == printed and "3/3" not in printed  # the heartbeat ended with it
    assert threading.active_count() == threads


def test_terminal_line_redraws_and_is_erased_on_failure():
    out = Terminal()
    with pytest.raises(KeyboardInterrupt):
        with Progress(4, "generate", stream=out) as progress:
            progress.update()
            raise KeyboardInterrupt
    text = out.getvalue()
    assert text.startswith("\r\033[Kgenerate |") and "1/4" in text
    assert text.endswith("\r\033[K") and "\n" not in text  # the interrupted line is cleared


# The stand-in slow machine: every forward pass sleeps DELAY seconds and a model load 5 *
# DELAY. With MIPO_MLX_PROGRESS_SECONDS=EVERY, no stage may be silent for longer than QUIET
# (the heartbeat's EVERY plus room for a loaded machine). Before the heartbeat, loading the
# model (2.5 s) and the PMI scoring (several forward passes) printed nothing for longer.
DELAY, EVERY, QUIET = 0.5, 0.5, 2.0


def silences(command: list[str], cwd: Path) -> tuple[float, list[str], subprocess.Popen]:
    """Run `command` with its output on one pipe; the longest wait between two lines after
    the first, and the lines."""
    env = {**os.environ, "MIPO_MLX_PROGRESS_SECONDS": str(EVERY), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "slow_stages.py"), str(DELAY), *command],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    times, lines = [], []
    for line in proc.stdout:
        times.append(time.monotonic())
        lines.append(line.rstrip("\n"))
    proc.wait(timeout=600)
    longest = max((b - a for a, b in zip(times, times[1:])), default=0.0)
    return longest, lines, proc


def test_no_stage_is_silent_on_a_slow_machine(toy_model_dir, tmp_path):
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
    for command in (train, evaluate, export):
        longest, lines, proc = silences(command, tmp_path)
        assert proc.returncode == 0, "\n".join(lines[-20:])
        assert longest <= QUIET, (command[0], longest, lines)
        seen += lines
    stages = {line.split(" |")[0] for line in seen if " |" in line}
    for stage in ("load", "answer (base)", "PMI (base)", "generate chosen", "score reference"):
        assert any(s.startswith(stage) for s in stages), (stage, stages)
    assert {"train", "PMI (mipo)", "fuse and check"} <= stages, stages
