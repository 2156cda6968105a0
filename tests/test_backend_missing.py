"""Without an MLX backend (plain `mlx` on Linux), the CLI says which extra to install."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_LIBRARY = "libmlx.so: cannot open shared object file: No such file or directory"


def without_backend(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m mipo_mlx.train ARGS` with a stand-in `mlx` package that fails like the
    backend-less Linux wheel does."""
    fake = tmp_path / "fake" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text(f"raise ImportError({NO_LIBRARY!r})\n")
    return subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{fake.parent}:{ROOT}", "PATH": "/usr/bin:/bin", **env},
        timeout=60,
    )


def test_missing_backend_is_one_line_and_exit_2(tmp_path):
    done = without_backend(tmp_path, "--model", "m", "--prompts", "p")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("error: mlx has no compute backend")
    assert "mipo_mlx[cpu]" in lines[0] and "mipo_mlx[cuda]" in lines[0]


def test_help_needs_no_backend(tmp_path):
    done = without_backend(tmp_path, "--help")
    assert done.returncode == 0 and "--training.learning_rate" in done.stdout


def test_missing_backend_is_one_line_whatever_the_blas_loader_would_say(tmp_path):
    """A setting that makes the BLAS loader speak (MIPO_MLX_BLAS naming no file) on a machine
    whose mlx has no backend: still the one error line, as there is no backend to speed up."""
    done = without_backend(
        tmp_path, "--model", "m", "--prompts", "p", MIPO_MLX_BLAS=str(tmp_path / "libnothing.so")
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: mlx has no compute backend"), lines
