"""The OpenBLAS thread policy (MIPO_MLX_THREADS): a count the user sets is kept, the default is
one thread, the split policies share the usable cores among the runs on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipo_mlx.core import backend as _backend
from mipo_mlx.core.backend import local_runs, thread_policy, thread_settings

CLEAN = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT")
needs_openblas = pytest.mark.skipif(
    sys.platform != "linux" or _backend.blas_threads() is None, reason="no OpenBLAS loaded here"
)
REPORT = (
    "import os, time, json\n"
    "import mipo_mlx\n"
    "from mipo_mlx.core import backend as _backend\n"
    "import mlx.core as mx\n"
    "a = mx.random.normal((512, 512))\n"
    "for _ in range(5): mx.eval(a @ a)\n"
    "t = os.times(); time.sleep(0.3); u = os.times()\n"
    "print(json.dumps({'threads': _backend.blas_threads(), 'line': _backend.blas_line(),"
    "'env': {k: os.environ.get(k) for k in"
    f" {CLEAN!r}}}, 'idle_cpu': u.user + u.system - t.user - t.system}}))\n"
)


def loaded(**env: str) -> tuple[dict, list[str]]:
    """A fresh interpreter's OpenBLAS under `env` (no thread setting of this process's own):
    its thread count, its environment after the load, its idle CPU time; and its notes."""
    environ = {k: v for k, v in os.environ.items() if k not in (*CLEAN, "MIPO_MLX_BLAS")}
    environ = {k: v for k, v in environ.items() if not k.startswith("MIPO_MLX_")}
    proc = subprocess.run(
        [sys.executable, "-c", REPORT],
        capture_output=True,
        text=True,
        env={**environ, **env},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), proc.stderr.splitlines()


@needs_openblas
@pytest.mark.parametrize("name", ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"])
def test_a_thread_count_the_user_sets_is_kept(name):
    """The user's 2 threads under the `one` policy: OpenBLAS reports 2, and the environment
    the process hands its children is the user's, nothing added."""
    if _backend.usable_cores() < 2:
        pytest.skip("one usable core: OpenBLAS runs one thread whatever is set")
    got, notes = loaded(**{name: "2"}, MIPO_MLX_THREADS="one")
    assert got["threads"] == 2 and not notes
    assert got["line"].endswith(", 2 threads (the count you set)")  # the run's log says so
    assert got["env"] == {key: ("2" if key == name else None) for key in CLEAN}


@needs_openblas
def test_the_default_adapts_and_quiet_policies_sleep_when_idle():
    """The default loads a pool of one thread a core and computes on one until a command's
    governor finds idle cores (a library user who imports the package gets one). `one` is one.
    Under split_quiet, idle threads sleep at once (OpenBLAS's own spin ~0.1 s after each call,
    on a core another process could use). The settings were there for the load only."""
    cores = _backend.usable_cores()
    got, notes = loaded()
    assert got["threads"] == 1 and not notes
    said = f", 1 to {cores} threads, as many as the machine leaves cores idle, 1 now"
    if cores < 2:
        said = ", 1 thread"
    assert got["line"].endswith(f"{said} (MIPO_MLX_THREADS=adapt)")  # the run's log says so
    assert got["env"] == dict.fromkeys(CLEAN)
    got, notes = loaded(MIPO_MLX_THREADS="one")
    assert got["threads"] == 1 and got["line"].endswith(", 1 thread (MIPO_MLX_THREADS=one)")
    got, notes = loaded(MIPO_MLX_THREADS="split_quiet")
    assert got["threads"] == cores and not notes
    assert got["idle_cpu"] < 0.03 and got["env"] == dict.fromkeys(CLEAN), got


@needs_openblas
def test_a_policy_not_understood_is_one_note_and_the_default():
    """A thread count is never a reason to stop a run: the note names the setting and the
    choices, and the default applies."""
    got, notes = loaded(MIPO_MLX_THREADS="fastest")
    assert notes == [
        "note: MIPO_MLX_THREADS=fastest is not a thread policy; using adapt "
        "(set it to one of openblas, one, split, split_quiet, adapt)"
    ]
    assert got["threads"] == 1 and "MIPO_MLX_THREADS=adapt" in got["line"]


def test_policies_on_one_and_on_two_local_runs():
    quiet = {"OPENBLAS_THREAD_TIMEOUT": "4"}
    assert thread_settings("split_quiet", 2, 1) == {"OPENBLAS_NUM_THREADS": "2", **quiet}
    assert thread_settings("split_quiet", 2, 2) == {"OPENBLAS_NUM_THREADS": "1", **quiet}
    assert thread_settings("split_quiet", 3, 2) == {"OPENBLAS_NUM_THREADS": "1", **quiet}
    assert thread_settings("split", 16, 2) == {"OPENBLAS_NUM_THREADS": "8"}
    assert thread_settings("one", 16, 1) == {"OPENBLAS_NUM_THREADS": "1"}
    assert thread_settings("openblas", 16, 2) == {}
    assert thread_settings("adapt", 16, 2) == {"OPENBLAS_NUM_THREADS": "8"}  # the pool
    assert thread_settings("adapt", 2, 2) == {"OPENBLAS_NUM_THREADS": "1"}  # no governor
    two_runs = {"MIPO_MLX_LOCAL_RUNS": "2", "MIPO_MLX_THREADS": "split_quiet"}
    assert thread_policy(two_runs, 2)[1] == {"OPENBLAS_NUM_THREADS": "1", **quiet}
    assert thread_policy({"OMP_NUM_THREADS": "3"}, 2) == ("user", {}, [])
    quiet_two = {"OPENBLAS_THREAD_TIMEOUT": "20", "MIPO_MLX_THREADS": "split_quiet"}
    assert thread_policy(quiet_two, 2)[1] == {"OPENBLAS_NUM_THREADS": "2"}
    assert thread_policy({"MIPO_MLX_LOCAL_RUNS": "two"}, 2) == (
        "adapt",
        {"OPENBLAS_NUM_THREADS": "2"},
        ["note: MIPO_MLX_LOCAL_RUNS=two is not a whole number above 0; ignored"],
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 256), st.integers(1, 16))
def test_split_never_asks_more_threads_than_cores(cores, runs):
    count = int(thread_settings("split", cores, runs)["OPENBLAS_NUM_THREADS"])
    assert count == max(1, cores // runs) and (count * runs <= cores or count == 1)


def test_local_runs_from_the_launchers(tmp_path):
    """mlx.launch's ring hostfile lists each rank's "ip:port": the ranks with this rank's address
    share its machine (loopback is one machine). Open MPI and MPICH say it themselves."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"]]))
    assert local_runs({"MLX_HOSTFILE": str(hostfile), "MLX_RANK": "1"}) == 2
    hostfile.write_text(json.dumps([["10.0.0.1:5"], ["10.0.0.2:6"], ["10.0.0.2:7", "10.1.0.2:8"]]))
    assert local_runs({"MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0"}) == 1
    assert local_runs({"MLX_HOSTFILE": str(hostfile), "MLX_RANK": "2"}) == 2
    hostfile.write_text("\n")  # mlx.launch -n 1: an empty hostfile
    assert local_runs({"MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0"}) == 1
    assert local_runs({"OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MLX_WORLD_SIZE": "8"}) == 4
    assert local_runs({"MPI_LOCALNRANKS": "3"}) == 3
    assert local_runs({"MLX_WORLD_SIZE": "2"}) == 2  # no list of hosts: all on this one
    assert local_runs({"MIPO_MLX_LOCAL_RUNS": "3", "MLX_WORLD_SIZE": "2"}) == 3
    assert local_runs({}) == 1


def test_the_note_says_the_split_once_from_the_first_rank(monkeypatch):
    chosen = {"policy": "split_quiet", "runs": 2, "settings": {"OPENBLAS_NUM_THREADS": "1"}}
    monkeypatch.setattr(_backend, "_threads", chosen)
    monkeypatch.setattr(_backend, "usable_cores", lambda: 2)
    for key in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert _backend.threads_note() == (
        "note: OpenBLAS on 1 thread in each of the 2 runs on this machine's 2 cores "
        "(MIPO_MLX_THREADS=split_quiet; OPENBLAS_NUM_THREADS sets a count)"
    )
    monkeypatch.setenv("MLX_RANK", "1")
    assert _backend.threads_note() is None
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setattr(_backend, "_threads", {**chosen, "runs": 1})
    assert _backend.threads_note() is None  # alone: nothing was taken away
