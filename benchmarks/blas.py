"""Which BLAS MLX's Linux CPU backend gets, and what it is worth, in one run.

  python benchmarks/blas.py               # matmul GFLOP/s of each BLAS found here

Each setting runs in a fresh interpreter (the BLAS is chosen before mlx.core loads):
- bundled: MIPO_MLX_BLAS=off, the reference BLAS MLX's wheel links;
- system: Debian's OpenBLAS (libopenblas0-pthread), where it is installed;
- pip: the OpenBLAS of the ngsolve-openblas wheel that `pip install 'mipo_mlx[cpu]'`
  brings on Linux x86-64 (MIPO_MLX_BLAS set to its path);
- pip, fresh machine: the default choice on a machine with neither the system OpenBLAS
  nor libgfortran (benchmarks/fresh_machine.py; root only), as a newcomer's machine.
A float32 n x n matmul: the median of 7 timed runs after one warm-up. Prints a table and
the ratios to the bundled BLAS. (The no-argument run's wall time with each is measured
with `/usr/bin/time` in BENCHMARKS.md.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MATMUL = """
import json, sys, time
import mipo_mlx
import mlx.core as mx
import numpy as np
from mipo_mlx.core.backend import blas_library
out = {"blas": blas_library()}
for n in (1024, 2048):
    a = mx.array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    mx.eval(a @ a)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        mx.eval(a @ a)
        times.append(time.perf_counter() - start)
    out[n] = 2 * n**3 / sorted(times)[3] / 1e9
print(json.dumps(out))
"""


def settings(workdir: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command prefix, environment) of each BLAS to measure here."""
    from fresh_machine import prefix

    from mipo_mlx.core.backend import _system_openblas, pip_openblas

    env = {k: v for k, v in os.environ.items() if k != "MIPO_MLX_BLAS"}
    found = [("bundled", [], {**env, "MIPO_MLX_BLAS": "off"})]
    system = _system_openblas()
    if system and Path(system).exists():
        found.append(("system", [], {**env, "MIPO_MLX_BLAS": system}))
    pip = pip_openblas()
    if pip:
        found.append(("pip", [], {**env, "MIPO_MLX_BLAS": pip}))
        fresh = prefix(workdir)
        if isinstance(fresh, list):
            found.append(("pip, fresh machine", fresh, env))
        else:
            print(f"(no fresh-machine row: {fresh})")
    return found


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, prefix, env in settings(Path(folder)):
            done = subprocess.run(
                [*prefix, sys.executable, "-c", MATMUL],
                capture_output=True,
                text=True,
                env=env,
                timeout=900,
            )
            if done.returncode != 0:
                print(f"{name}: failed: {done.stderr.strip()[-400:]}")
                continue
            row = {"setting": name, **json.loads(done.stdout.splitlines()[-1])}
            row["notes"] = [line for line in done.stderr.splitlines() if line.startswith("note:")]
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]
    print("\n| setting | library | GFLOP/s 1024 | GFLOP/s 2048 | vs bundled |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        line = (
            f"| {row['setting']} | {Path(row['blas'].split(' (')[0]).name} | "
            f"{row['1024']:.1f} | {row['2048']:.1f} | {row['1024'] / base['1024']:.1f}x |"
        )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
