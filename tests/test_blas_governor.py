"""The adaptive BLAS thread count: down at once when other processes take cores, up only after
two samples found cores idle, never past the pool or below one; the count the user sets is
never touched; and changing the count while MLX computes leaves every product right."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipo_mlx.core import backend as _backend
from mipo_mlx.core.blas_governor import Governor, busy_seconds, next_count, threads_for

needs_openblas = pytest.mark.skipif(
    sys.platform != "linux" or _backend.blas_threads() is None, reason="no OpenBLAS loaded here"
)
CLEAN = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT")


@settings(max_examples=300, deadline=None)
@given(
    st.floats(-1, 300, allow_nan=False),
    st.floats(0, 300, allow_nan=False),
    st.integers(1, 256),
    st.integers(1, 256),
)
def test_the_count_is_within_the_pool_and_falls_as_others_take_cores(others, more, cores, most):
    most = min(most, cores)
    count = threads_for(others, cores, most)
    assert 1 <= count <= most
    assert threads_for(others + more, cores, most) <= count  # busier never means more
    assert threads_for(0, cores, most) == most  # an idle machine: the whole pool
    if others >= cores - 0.7 + 1e-9:  # no core left idle
        assert count == 1


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64), st.lists(st.integers(1, 64), min_size=1, max_size=2))
def test_down_at_once_up_only_after_two_samples(current, allowed):
    count = next_count(current, allowed)
    assert 1 <= count <= allowed[-1]  # never above what the last sample allows
    if count > current:
        assert len(allowed) == 2 and count <= min(allowed)
    if allowed[-1] < current:
        assert count == allowed[-1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 10**9), min_size=10, max_size=10), min_size=1, max_size=8),
    st.data(),
)
def test_busy_time_counts_only_the_process_cores_and_busy_fields(rows, data):
    mine = data.draw(st.sets(st.integers(0, len(rows) - 1)))
    total = [sum(column) for column in zip(*rows)]
    text = "\n".join(
        [
            "cpu  " + " ".join(map(str, total)),
            *(f"cpu{i} " + " ".join(map(str, r)) for i, r in enumerate(rows)),
            "intr 12 3 4",
            "ctxt 999",
            "btime 1700000000",
        ]
    )
    busy = sum(r[f] for i, r in enumerate(rows) if i in mine for f in (0, 1, 2, 5, 6, 7))
    assert busy_seconds(text, mine, 100) == busy / 100  # idle, iowait, guest: not busy


class Machine:
    """A stand-in /proc/stat and process clock: `advance` says how many core-seconds the
    others and this process used in the last `wall` seconds."""

    def __init__(self, cpus: int):
        self.cpus, self.others, self.own, self.clock = cpus, 0.0, 0.0, 0.0

    def advance(self, others: float, own: float, wall: float = 0.5) -> None:
        self.others += others * wall
        self.own += own * wall
        self.clock += wall

    def stat(self) -> str:
        each = round((self.others + self.own) * 100 / self.cpus)
        return "\n".join(f"cpu{i} {each} 0 0 0 0 0 0 0 0 0" for i in range(self.cpus))


def test_the_governor_follows_the_machine(monkeypatch):
    machine = Machine(cpus=4)
    monkeypatch.setattr("mipo_mlx.core.blas_governor.time.monotonic", lambda: machine.clock)
    monkeypatch.setattr("mipo_mlx.core.blas_governor.os.sysconf", lambda name: 100)
    calls = []
    governor = Governor(calls.append, 4, [0, 1, 2, 3], machine.stat, lambda: machine.own)
    seen = []
    for others, own in [(0, 1), (0, 1), (0, 4), (1.0, 3), (1.0, 3), (1.0, 3), (2.9, 1), (0, 1)]:
        machine.advance(others, own)
        seen.append(governor.step())
    assert seen == [1, 4, 4, 3, 3, 3, 1, 1]  # its own threads never count against it
    assert calls == [4, 3, 1]  # OpenBLAS is told only of a change


def cores_to_share() -> int:
    """The usable cores; the test is skipped where there is one (nothing to adapt)."""
    cores = _backend.usable_cores()
    if cores < 2:
        pytest.skip("one usable core: OpenBLAS runs one thread whatever is set")
    return cores


def reported(code: str, **env: str) -> dict:
    """What a fresh interpreter running `code` under `env` printed, as JSON."""
    proc = run_python(code, **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in CLEAN}
    environ = {k: v for k, v in environ.items() if not k.startswith("MIPO_MLX_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**environ, **env},
        timeout=300,
    )


BUSY_MACHINE = """
import json, os, subprocess, sys, time
import mipo_mlx
from mipo_mlx.core import backend as _backend
hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range({n})]
try:
    time.sleep(0.5)
    _backend.require_mlx()
    governor = _backend.start_governor()
    time.sleep(2.2)
    print(json.dumps({{"counts": governor.counts if governor else None,
                      "threads": _backend.blas_threads()}}))
finally:
    for hog in hogs:
        hog.kill()
"""


@pytest.mark.integration  # busy-loop processes on every core, 3 s
@needs_openblas
def test_beside_busy_processes_it_computes_on_one_thread():
    """A busy-loop process on every core: the governor keeps OpenBLAS on one thread."""
    got = reported(BUSY_MACHINE.format(n=cores_to_share()))
    assert got["counts"] and set(got["counts"]) == {1} and got["threads"] == 1, got


@pytest.mark.integration  # two interpreters beside busy loops, 3 s each
@needs_openblas
def test_a_thread_count_the_user_sets_starts_no_governor():
    cores = cores_to_share()
    got = reported(BUSY_MACHINE.format(n=cores), OPENBLAS_NUM_THREADS=str(cores))
    assert got == {"counts": None, "threads": cores}
    got = reported(BUSY_MACHINE.format(n=0), MIPO_MLX_THREADS="one")
    assert got == {"counts": None, "threads": 1}


TOGGLED = """
import json, threading
import numpy as np
import mipo_mlx
from mipo_mlx.core import backend as _backend
from mipo_mlx.core.blas_governor import Governor
import mlx.core as mx
idle = lambda: "\\n".join(f"cpu{{i}} 0 0 0 0 0 0 0 0 0 0" for i in range({cores}))
governor = Governor(_backend.openblas_setter(), {cores}, list(range({cores})),
                    idle, lambda: 0.0, period=0.001)
seen = set()
def toggle():
    for n in range(3000):
        governor.set_threads(1 + n % {cores})
        seen.add(_backend.blas_threads())
worker = threading.Thread(target=toggle)
rng = np.random.default_rng(0)
a, b = rng.standard_normal((2, 160, 700)).astype(np.float32)
worst = 0.0
worker.start()
while worker.is_alive():
    got = np.array(mx.array(a) @ mx.array(b.T))
    worst = max(worst, float(np.abs(got - a @ b.T).max()))
governor.step(); governor.step()
print(json.dumps({{"worst": worst, "seen": sorted(seen), "after": _backend.blas_threads()}}))
"""


@needs_openblas
def test_changing_the_count_while_mlx_computes_keeps_every_product_right():
    """The count changes from another thread thousands of times while MLX multiplies; every
    product matches numpy's, and on an idle stand-in machine two samples give the whole pool."""
    cores = cores_to_share()
    got = reported(TOGGLED.format(cores=cores))
    assert got["worst"] < 1e-3 and got["seen"] == list(range(1, cores + 1)), got
    assert got["after"] == cores
