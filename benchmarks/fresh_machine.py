"""Run a command as on a fresh Linux machine: no system OpenBLAS, no libgfortran.

  python benchmarks/fresh_machine.py COMMAND ...

As root, in a mount namespace, an overlay hides Debian's OpenBLAS (libopenblas0-pthread)
and the libgfortran it brings from /usr/lib/<arch>-linux-gnu; nothing outside the command
sees a change. The tests (tests/test_backend.py) and benchmarks/blas.py use it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

LIBS = Path(f"/usr/lib/{platform.machine()}-linux-gnu")
HIDDEN = [
    "libblas.so.3",
    "liblapack.so.3",
    "libopenblas.so.0",
    "openblas-pthread",
    "openblas-openmp",
    "libgfortran.so.5",
    "libgfortran.so.5.0.0",
]


def prefix(workdir: Path) -> list[str] | str:
    """The command prefix that runs a command on the fresh machine, or why it can't here.
    `workdir` holds the overlay's upper and work folders."""
    if sys.platform != "linux" or os.geteuid() != 0 or not LIBS.is_dir():
        return "needs root on Linux to hide the system libraries"
    upper, work = workdir / "upper", workdir / "work"
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    for name in HIDDEN:
        if not (upper / name).exists():
            os.mknod(upper / name, 0o644 | 0o020000, os.makedev(0, 0))  # an overlay whiteout
    mount = f"mount -t overlay overlay -o lowerdir={LIBS},upperdir={upper},workdir={work} {LIBS}"
    command = ["unshare", "-m", "bash", "-c", f'{mount} && exec "$@"', "_"]
    probe = subprocess.run([*command, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a mount namespace here: {probe.stderr.strip()}"
    return command


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        made = prefix(Path(folder))
        if isinstance(made, str):
            sys.exit(f"error: {made}")
        sys.exit(subprocess.run([*made, *sys.argv[1:]]).returncode)
