"""Compute backend and BLAS selection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mipo_mlx  # noqa: F401  (loads the system BLAS before mlx.core, as the package does)
from mipo_mlx.core import backend as _backend

SYSTEM_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
needs_openblas = pytest.mark.skipif(
    not Path(SYSTEM_OPENBLAS).exists() or sys.platform != "linux",
    reason="system OpenBLAS (libopenblas0-pthread) not installed",
)


def python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "MIPO_MLX_BLAS"}
    environ.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_blas_library_returns_a_string():
    name = _backend.blas_library()
    assert isinstance(name, str) and name
    if sys.platform == "linux":
        assert name == _backend._loaded_blas or name.startswith("bundled reference BLAS")


def test_require_mlx_does_not_raise():
    assert _backend.require_mlx() is None


def test_backend_hint_names_the_extras():
    assert "mipo_mlx[cpu]" in _backend.BACKEND_HINT and "mipo_mlx[cuda]" in _backend.BACKEND_HINT


@needs_openblas
def test_import_loads_system_openblas():
    code = (
        "import mipo_mlx\n"
        "from mipo_mlx.core.backend import blas_library\n"
        "import os\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(blas_library())\n"
        f"print(os.path.realpath({SYSTEM_OPENBLAS!r}) in maps)\n"
    )
    assert python(code).splitlines() == [SYSTEM_OPENBLAS, "True"]


@needs_openblas
def test_blas_can_be_switched_off():
    out = python(
        "import mipo_mlx\nfrom mipo_mlx.core.backend import blas_library\nprint(blas_library())",
        MIPO_MLX_BLAS="off",
    )
    assert out == _backend.SLOW_BLAS


def blas_with(setting: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter with MIPO_MLX_BLAS=setting: which BLAS it loaded, and its notes."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mipo_mlx\n"
            "from mipo_mlx.core.backend import blas_library\n"
            "print(blas_library())",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MIPO_MLX_BLAS": str(setting)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_blas_path_that_does_not_exist_is_a_note_then_the_usual_search(tmp_path):
    missing = tmp_path / "libnothing.so"
    proc = blas_with(missing)
    assert proc.stderr.strip() == (
        f"note: MIPO_MLX_BLAS={missing}: no such file; looking for the system OpenBLAS "
        "instead (set it to a library path, or to off)"
    )
    found = SYSTEM_OPENBLAS if Path(SYSTEM_OPENBLAS).exists() else _backend.pip_openblas()
    assert proc.stdout.strip().startswith(found or "bundled reference BLAS")


def test_blas_library_that_cannot_load_is_a_note(tmp_path):
    broken = tmp_path / "libbroken.so"
    broken.write_bytes(b"not a shared library")
    proc = blas_with(broken)
    assert proc.stderr.startswith(f"note: could not load {broken}")
    assert proc.stdout.strip().startswith("bundled reference BLAS")


@pytest.fixture
def fresh_machine(tmp_path):
    """A command prefix that runs a command as on a fresh Linux machine: no system OpenBLAS,
    no libgfortran (benchmarks/fresh_machine.py; skips where it can't)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fresh_machine import prefix

    if _backend.pip_openblas() is None:
        pytest.skip("the pip OpenBLAS (ngsolve-openblas) is not installed")
    made = prefix(tmp_path)
    if isinstance(made, str):
        pytest.skip(made)
    return made


def on_fresh_machine(prefix: list[str], code: str, **env: str) -> subprocess.CompletedProcess:
    """Python `code` run on the fresh machine, with MIPO_MLX_BLAS unset unless `env` sets it."""
    environ = {k: v for k, v in os.environ.items() if k != "MIPO_MLX_BLAS"}
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.integration  # the fresh-machine simulation
def test_fresh_machine_gets_the_pip_openblas(fresh_machine):
    """No system OpenBLAS and no libgfortran: `pip install mipo_mlx[cpu]` alone gives MLX a
    fast BLAS. MLX's cblas_sgemm and LAPACK calls bind to it, and the results are right."""
    code = (
        "import mipo_mlx, numpy as np, mlx.core as mx\n"
        "from mipo_mlx.core.backend import blas_library\n"
        "print(blas_library())\n"
        "a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)\n"
        "want = a.astype(np.float64) @ a\n"
        "got = np.array(mx.matmul(mx.array(a), mx.array(a), stream=mx.cpu))\n"
        "print(np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5)\n"
        "m = a @ a.T + 256 * np.eye(256, dtype=np.float32)\n"
        "inv = np.array(mx.linalg.inv(mx.array(m), stream=mx.cpu))\n"
        "print(np.abs(inv @ m - np.eye(256)).max() < 1e-4)\n"
    )
    proc = on_fresh_machine(fresh_machine, code, LD_DEBUG="bindings")
    assert proc.stdout.split() == [_backend.pip_openblas(), "True", "True"]
    lines = proc.stderr.splitlines()
    bound = [line for line in lines if "libmlx.so" in line and "`cblas_sgemm'" in line]
    assert bound and all("libopenblas" in line for line in bound), bound
    assert not any(line.startswith("note:") for line in lines)


@pytest.mark.integration  # the fresh-machine simulation
def test_fresh_machine_without_a_libgfortran_falls_back_with_one_note(fresh_machine):
    """Where no libgfortran can be had either, the pip OpenBLAS cannot load: one note, and MLX
    works on with its own BLAS (the import never fails for it)."""
    code = (
        "import os\n"
        "import mipo_mlx.core.backend as b\n"  # with MIPO_MLX_BLAS=off, the import loaded nothing
        "del os.environ['MIPO_MLX_BLAS']\n"
        "b._provide_libgfortran = lambda: False\n"
        "print(b.prefer_system_blas())\n"
        "import mlx.core as mx\n"
        "print((mx.ones((4, 4)) @ mx.ones((4, 4))).sum().item())\n"
    )
    proc = on_fresh_machine(fresh_machine, code, MIPO_MLX_BLAS="off")
    assert proc.stdout.split() == ["None", "64.0"]
    notes = proc.stderr.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: could not load "), notes
    assert "libgfortran.so.5" in notes[0] and notes[0].endswith("which is slower")


def test_too_late_after_mlx_is_imported():
    out = python(
        "import mlx.core\nimport mipo_mlx\nfrom mipo_mlx.core.backend import blas_library\n"
        "print(blas_library())"
    )
    assert out == _backend.SLOW_BLAS


@needs_openblas
def test_matmul_with_system_blas_matches_numpy():
    import mlx.core as mx

    assert _backend.blas_library() == SYSTEM_OPENBLAS, "mlx.core was imported before mipo_mlx"
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 256)).astype(np.float32)
    b = rng.standard_normal((256, 256)).astype(np.float32)
    with mx.stream(mx.cpu):
        got = np.array(mx.matmul(mx.array(a), mx.array(b)))
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert got.dtype == np.float32 and got.shape == (256, 256)
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert relative < 1e-3
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-3
    # a transposed operand takes another BLAS path (trans flags)
    with mx.stream(mx.cpu):
        got_t = np.array(mx.matmul(mx.array(a).T, mx.array(b)))
    want_t = a.T.astype(np.float64) @ b.astype(np.float64)
    assert np.linalg.norm(got_t - want_t) / np.linalg.norm(want_t) < 1e-3


def test_no_metal_only_device_info_lookup():
    """mx.device_info() has 'max_recommended_working_set_size' on Metal only; indexing it
    stops other backends with a KeyError (as mlx-lm-lora's trainers do on Linux). Our code
    reads device_info with .get only."""
    import re
    from pathlib import Path

    offenders = []
    for path in Path(mipo_mlx.__file__).parent.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"device_info\(\)\s*\[", line) or re.search(
                r"\binfo\s*\[\s*['\"]max_recommended", line
            ):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_working_set_without_metal_key(monkeypatch):
    import mlx.core as mx

    from mipo_mlx.engine.memory import working_set_bytes

    monkeypatch.setattr(mx, "device_info", lambda: {"memory_size": 1}, raising=False)
    assert working_set_bytes() > 0  # the physical memory, no KeyError


def test_a_folder_named_mlx_in_the_working_directory_keeps_the_fast_blas(tmp_path):
    """MLX keeps its kernel cache in `<temp>/mlx/<version>`: from the temp folder (or any folder
    holding an `mlx/`), `mlx` is a namespace package whose first portion is that folder. The
    loader still finds MLX's own install, and the same BLAS loads as from anywhere else."""
    if sys.platform != "linux" or _backend._loaded_blas is None:
        pytest.skip("no fast BLAS to load on this machine")
    (tmp_path / "mlx" / "0.32.4" / "cpu").mkdir(parents=True)
    code = (
        "import mipo_mlx\n"
        "from mipo_mlx.core import backend as b\n"
        "print(b.blas_library())\n"
        "print(b.mlx_library())\n"
        "import mlx.core as mx\n"
        "print(mx.__file__.startswith(str(b.mlx_library().parents[1])))\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "MIPO_MLX_BLAS"}
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=cwd,
            capture_output=True,
            text=True,
            env=environ,
            timeout=120,
        )
        for cwd in (tmp_path, Path(__file__).parent)
    ]
    assert all(done.returncode == 0 for done in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stderr == runs[1].stderr
    blas, library, same = runs[0].stdout.split("\n")[:3]
    assert blas != _backend.SLOW_BLAS and same == "True"
    assert Path(library).parts[-3:] == ("mlx", "lib", "libmlx.so")


def test_mlx_library_reads_sys_path_as_the_import_system_does(tmp_path, monkeypatch):
    """A folder named mlx without MLX's library is passed over (a namespace portion); a regular
    package named mlx hides MLX (a stand-in: no backend, so nothing to load). MLX's own
    libgfortran comes first even where another wheel's sits earlier on sys.path."""
    real = _backend.mlx_library()
    if real is None:
        pytest.skip("this MLX has no backend library")
    cache, stand_in, other = (tmp_path / name for name in ("cache", "stand_in", "other"))
    (cache / "mlx" / "0.32.4").mkdir(parents=True)
    (stand_in / "mlx").mkdir(parents=True)
    (stand_in / "mlx" / "__init__.py").write_text("")
    (other / "numpy.libs").mkdir(parents=True)
    (other / "numpy.libs" / "libgfortran-0123abcd.so.5.0.0").write_bytes(b"")
    site = list(sys.path)
    monkeypatch.setattr(sys, "path", [str(cache), str(other), *site])
    assert _backend.mlx_library() == real
    copies = _backend._libgfortran_copies(real)
    if any(real.parents[2].glob("mlx*.libs/libgfortran*")):
        assert copies[0].parent.parent == real.parents[2], copies
    monkeypatch.setattr(sys, "path", [str(stand_in), *site])
    assert _backend.mlx_library() is None


def test_every_write_of_the_libgfortran_copy_is_checked(tmp_path, monkeypatch):
    """A short write that stops for good (a file-size limit) or a failed write: the copy is
    not whole, so it is never mapped."""
    data = bytes(range(256)) * 64
    real_write = os.write

    def writes(*results):
        given = iter(results)

        def write(fd, view):
            result = next(given)
            if isinstance(result, Exception):
                raise result
            return real_write(fd, view[:result])

        return write

    for case, results in {
        "whole": (len(data),),
        "in two parts": (1000, len(data) - 1000),
        "stuck": (1000, 0),
        "limit reached": (1000, OSError(27, "File too large")),
    }.items():
        fd = os.open(tmp_path / case, os.O_RDWR | os.O_CREAT)
        monkeypatch.setattr(os, "write", writes(*results))
        whole = _backend._write_whole(fd, data)
        monkeypatch.setattr(os, "write", real_write)
        os.close(fd)
        assert whole == (case in ("whole", "in two parts")), case
        assert whole == ((tmp_path / case).read_bytes() == data), case


def test_help_works_under_a_small_file_size_limit(tmp_path):
    """With RLIMIT_FSIZE below the libgfortran copy's size, the copy is cut short: it is not
    mapped (mapping it died of SIGBUS), and the command runs on."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    environ = {k: v for k, v in os.environ.items() if k != "MIPO_MLX_BLAS"}
    done = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        preexec_fn=limit,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m mipo_mlx.train")
    assert all(line.startswith("note: could not load") for line in done.stderr.splitlines())
