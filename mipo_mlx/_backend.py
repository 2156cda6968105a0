"""Finding a compute backend for MLX, and a fast BLAS for its CPU backend.

Both must happen before `mlx.core` is first imported, which is why the package
`__init__` calls `prefer_system_blas` and the CLIs call `require_mlx` before
importing anything that imports mlx.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

from .errors import UserError

# Debian/Ubuntu's multithreaded OpenBLAS, then whatever the loader can find.
_BLAS_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
_loaded_blas: str | None = None

BACKEND_HINT = (
    "mlx has no compute backend on this machine: on Linux the plain `mlx` wheel ships none; "
    "install one with `pip install 'mipo_mlx[cpu]'` (CPU) or `pip install 'mipo_mlx[cuda]'` "
    "(NVIDIA GPU); on macOS plain `mlx` uses Metal"
)


def _find_openblas() -> str | None:
    choice = os.environ.get("MIPO_MLX_BLAS", "")
    if choice.lower() in {"0", "off", "none", "bundled"}:
        return None
    if choice:
        if Path(choice).exists():
            return choice
        print(
            f"note: MIPO_MLX_BLAS={choice}: no such file; looking for the system OpenBLAS "
            "instead (set it to a library path, or to off)",
            file=sys.stderr,
        )
    arch = platform.machine()
    for pattern in _BLAS_CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).exists():
            return path
    return ctypes.util.find_library("openblas")


def prefer_system_blas() -> str | None:
    """Load the system OpenBLAS into the global symbol scope, before mlx loads.

    MLX's Linux CPU wheel links a reference BLAS (about 5 GFLOP/s for a float32
    1024x1024 matmul on a 2-core x86 machine); its `cblas_*` symbols resolve through
    the global scope first, so a library loaded here with RTLD_GLOBAL wins (about
    30x faster measured). Set MIPO_MLX_BLAS=off to keep the bundled one, or to a
    path to choose another library. Returns the library path used, if any.
    """
    global _loaded_blas
    if _loaded_blas or sys.platform != "linux" or "mlx.core" in sys.modules:
        return _loaded_blas
    path = _find_openblas()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as err:
        print(
            f"note: could not load {path} ({err}); MLX keeps its bundled BLAS, which is slower",
            file=sys.stderr,
        )
        return None
    _loaded_blas = path
    return path


def blas_library() -> str:
    """Which BLAS the CPU backend uses, for logs and benchmark reports."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    return _loaded_blas or "bundled reference BLAS (slow; install libopenblas0-pthread)"


def require_mlx() -> None:
    """Import mlx.core, or fail with one line that says which extra to install."""
    try:
        import mlx.core as mx

        mx.array(1.0) + 1  # a backend-less install fails here, not at import
    except (ImportError, OSError, RuntimeError) as err:
        raise UserError(f"{BACKEND_HINT} ({type(err).__name__}: {err})") from None
