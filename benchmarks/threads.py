"""OpenBLAS thread policies (MIPO_MLX_THREADS) on a machine that is not idle: the wall time of
one training run in four situations, each policy interleaved with the others round by round.

    python benchmarks/threads.py --quick               # openblas, one, adapt; 3 rounds (~20 min)
    python benchmarks/threads.py --quick --rounds 1    # a screening run (~7 min, 2 cores)
    python benchmarks/threads.py --policies openblas,one,adapt,split,split_quiet

Situations: alone; beside a CPU hog (a busy-loop process); two runs at once (the time of
each); two ranks of `mlx.launch -n 2 --backend ring` on this machine. The run is
`python -m mipo_mlx.train --data.limit 96 --evaluation.limit 40 --training.iters 6` on the
embedded default (--quick: a smaller one), each in its own folder under a temporary one, with
the policy set by MIPO_MLX_THREADS and any thread count of the caller's environment removed.
Prints the table (median and min-max seconds) and a last line with the old default
(`openblas`) over the default policy, per situation (medians; above 1 is faster now).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mipo_mlx  # noqa: F401  (first: the BLAS)
from mipo_mlx.core.backend import DEFAULT_THREADS, RUNS_SETTING, THREAD_POLICIES, USER_COUNTS

OLD = "openblas"  # what every process got before the policy: OpenBLAS's own threads
WORKLOAD = ["--data.limit", "96", "--evaluation.limit", "40", "--training.iters", "6"]
QUICK = [*"--data.limit 32 --evaluation.limit 10 --guard.limit 20 --training.iters 2".split()]
SITUATIONS = ("alone", "hog", "two_runs", "two_ranks")
TRAIN = [sys.executable, "-m", "mipo_mlx.train"]


def environment(policy: str) -> dict[str, str]:
    """The caller's environment with `policy` and no thread count of its own."""
    env = {k: v for k, v in os.environ.items() if k not in (*USER_COUNTS, RUNS_SETTING)}
    env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    return {**env, "MIPO_MLX_THREADS": policy}


def start(command: list[str], policy: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=environment(policy)
        )


def finish(proc: subprocess.Popen, began: float, folder: Path, log: Path) -> float:
    """Seconds from `began` to the run's end; stops the benchmark when the run failed (every
    rank's output included: mlx.launch exits 0 even when a rank fails)."""
    proc.wait()
    took = time.perf_counter() - began
    text = log.read_text()
    said = [line for line in text.splitlines() if line.startswith("error:") or "Traceback" in line]
    if proc.returncode or said or not (folder / "adapters.safetensors").is_file():
        sys.exit(f"a run failed ({log}):\n{text[-2000:]}")
    return took


def runs(situation: str, policy: str, work: list[str], tmp: Path) -> list[float]:
    """The wall time of each training run of `situation` under `policy`."""
    name = f"{situation}-{policy}-{len(list(tmp.iterdir()))}"
    folders = [tmp / f"{name}-{i}" for i in range(2 if situation == "two_runs" else 1)]
    command = TRAIN
    if situation == "two_ranks":
        port = str(random.randint(20000, 60000))  # a fresh port: the last run's may linger
        command = ["mlx.launch", "-n", "2", "--backend", "ring", "-p", port, *TRAIN]
    hog = None
    if situation == "hog":
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        began = time.perf_counter()
        procs = [
            start([*command, *work, "--output", str(f)], policy, f.with_suffix(".log"))
            for f in folders
        ]
        return [finish(p, began, f, f.with_suffix(".log")) for p, f in zip(procs, folders)]
    finally:
        if hog:
            hog.kill()
            hog.wait()


def cell(times: list[float]) -> str:
    return f"{statistics.median(times):.1f} ({min(times):.1f}-{max(times):.1f})"


def report(times: dict, policies: list[str]) -> None:
    print("| situation | " + " | ".join(policies) + " |")
    print("|---" * (len(policies) + 1) + "|")
    for situation in SITUATIONS:
        cells = [cell(times[situation, p]) for p in policies]
        print(f"| {situation} | " + " | ".join(cells) + " |")
    median = {key: statistics.median(value) for key, value in times.items()}
    ratios = [f"{s}_ratio={median[s, OLD] / median[s, DEFAULT_THREADS]:.2f}" for s in SITUATIONS]
    print(f"policy={DEFAULT_THREADS} " + " ".join(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default="openblas,one,adapt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smaller run, for screening")
    args = parser.parse_args()
    policies = list(dict.fromkeys([OLD, DEFAULT_THREADS, *args.policies.split(",")]))
    unknown = [p for p in policies if p not in THREAD_POLICIES]
    if unknown:
        parser.error(f"unknown policies {unknown}; choose from {', '.join(THREAD_POLICIES)}")
    work = QUICK if args.quick else WORKLOAD
    times: dict = {(s, p): [] for s in SITUATIONS for p in policies}
    with tempfile.TemporaryDirectory() as folder:
        for number in range(args.rounds):
            for situation in SITUATIONS:
                for policy in policies:
                    took = runs(situation, policy, work, Path(folder))
                    times[situation, policy] += took
                    print(f"round {number + 1} {situation} {policy}: {took}", file=sys.stderr)
    print(f"{os.cpu_count()} cores, {len(os.sched_getaffinity(0))} usable; {' '.join(work)}")
    report(times, policies)


if __name__ == "__main__":
    main()
