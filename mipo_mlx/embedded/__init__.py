"""The embedded default: a small chat model and its synthetic tasks, shipped with the package.

`python -m mipo_mlx.train` with no arguments runs `default.yaml`; paths in it
start with `@embedded/`, which means this folder.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = "@embedded/"


def default_config_path() -> Path:
    return HERE / "default.yaml"


def resolve_path(path: str | None) -> str | None:
    """'@embedded/model' -> the folder inside the installed package; other paths unchanged."""
    if path is not None and path.startswith(PREFIX):
        return str(HERE / path[len(PREFIX) :])
    return path
