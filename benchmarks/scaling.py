"""1 process vs N processes (`mlx.launch -n N --backend ring`) on this machine: generation and
training throughput of mipo_mlx's data-parallel path, same global batch.

    python benchmarks/scaling.py [--ranks 2]

Runs the embedded default model and prompts (512 prompts; 64-token answers; 20 steps of
16 pairs), once in one process and once under mlx.launch, and prints a table. On one
machine the ranks share its cores, so this measures the overhead of the distributed
path, not the gain of a second machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mipo_mlx  # noqa: F401  (first: the system BLAS)

GLOBAL_BATCH = 16
STEPS = 20


def worker(out: str) -> None:
    from mipo_mlx.core.settings import resolve
    from mipo_mlx.data.prompts import read_source, render_prompts
    from mipo_mlx.embedded import default_config_path
    from mipo_mlx.engine import distributed as dist
    from mipo_mlx.stages.pairs import make_pairs
    from mipo_mlx.stages.reference import score_reference, shared_prompt
    from mipo_mlx.stages.run import Run
    from mipo_mlx.stages.training import train

    config = resolve(
        str(default_config_path()),
        {
            "output.dir": out,
            "evaluation.prompts": None,
            "pairs.negatives": "random",  # one generation pass: the generation figure is its own
            "pairs.samples": 1,
            "pairs.drop_identical": False,
            "training.iters": STEPS,
            "training.batch_size": GLOBAL_BATCH // dist.size(),
            "training.valid_every": 0,
        },
    )
    run = Run.load(config)
    rendered = render_prompts(
        read_source(config.data.prompts), run.tokenizer, config.data, config.data.prompts
    )
    tic = time.perf_counter()
    pairs = make_pairs(run, rendered)
    generate_s = time.perf_counter() - tic
    shared = shared_prompt(run, pairs)
    tic = time.perf_counter()
    score_reference(run, pairs, shared)
    score_s = time.perf_counter() - tic
    train(run, pairs, shared)
    if dist.is_main():
        steps = [
            json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
        ]
        print(
            "RESULT "
            + json.dumps(
                {
                    "ranks": dist.size(),
                    "generate_s": generate_s,
                    "score_s": score_s,
                    "generated_tokens": sum(len(p.chosen_ids) for p in pairs),
                    "pairs": len(pairs),
                    "step_s": statistics.median(s["step_seconds"] for s in steps[2:]),
                }
            ),
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    rows = []
    for n in (1, args.ranks):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--worker", str(Path(tmp) / "out")]
            if n > 1:
                cmd = [shutil.which("mlx.launch"), "-n", str(n), "--backend", "ring", *cmd]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(lines[-1][7:]))
    print(
        "| processes | generation tokens/s | reference scoring pairs/s "
        "| training s/step (global batch 16) |"
    )
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['generated_tokens'] / r['generate_s']:.0f} | "
            f"{r['pairs'] / r['score_s']:.0f} | "
            f"{r['step_s']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
