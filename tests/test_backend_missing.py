"""Without an MLX backend (plain `mlx` on Linux), the CLI says which extra to install."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_missing_backend_is_one_line_and_exit_2(tmp_path):
    # A stand-in `mlx` package that fails like the backend-less Linux wheel does.
    fake = tmp_path / "fake" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text(
        "raise ImportError("
        "'libmlx.so: cannot open shared object file: No such file or directory')\n"
    )
    env = {"PYTHONPATH": f"{fake.parent}:{ROOT}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", "--model", "m", "--prompts", "p"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("error: mlx has no compute backend")
    assert "mipo_mlx[cpu]" in lines[0] and "mipo_mlx[cuda]" in lines[0]


def test_help_needs_no_backend(tmp_path):
    fake = tmp_path / "fake" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text("raise ImportError('no backend')\n")
    env = {"PYTHONPATH": f"{fake.parent}:{ROOT}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0 and "--training.learning_rate" in done.stdout


def test_missing_backend_is_one_line_whatever_the_blas_loader_would_say(tmp_path):
    """A setting that makes the BLAS loader speak (MIPO_MLX_BLAS naming no file) on a machine
    whose mlx has no backend: still the one error line, as there is no backend to speed up."""
    fake = tmp_path / "fake" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text("raise ImportError('libmlx.so: cannot open shared object')\n")
    env = {
        "PYTHONPATH": f"{fake.parent}:{ROOT}",
        "PATH": "/usr/bin:/bin",
        "MIPO_MLX_BLAS": str(tmp_path / "libnothing.so"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", "--model", "m", "--prompts", "p"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: mlx has no compute backend"), lines
