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
    from mipo_mlx.engine import model as mdl
    from mipo_mlx.engine.generation import generate_all
    from mipo_mlx.engine.probes import use_shared_prompt
    from mipo_mlx.stages.pairs import random_pairs, split_pairs
    from mipo_mlx.stages.reference import add_reference_logps
    from mipo_mlx.stages.run_folder import RunFolder
    from mipo_mlx.stages.training import train_adapters

    config = resolve(
        str(default_config_path()),
        {
            "output.dir": out,
            "evaluation.prompts": None,
            "training.iters": STEPS,
            "training.batch_size": GLOBAL_BATCH // dist.size(),
            "training.valid_every": 0,
        },
    )
    model, tokenizer, _ = mdl.load(config.model)
    pad = mdl.pad_id(tokenizer)
    rendered = render_prompts(
        read_source(config.data.prompts), tokenizer, config.data, config.data.prompts
    )
    tic = time.perf_counter()
    positives = generate_all(model, tokenizer, rendered.ids, config.generation, "generate", 0)
    generate_s = time.perf_counter() - tic
    pairs = split_pairs(
        random_pairs(rendered, positives, tokenizer, config.generation, config.pairs.seed), 0.05, 0
    )
    shared = use_shared_prompt(model, pairs, config.training.shared_prompt, pad)
    tic = time.perf_counter()
    add_reference_logps(model, pairs, pad, config.training.score_batch_size, shared)
    score_s = time.perf_counter() - tic
    Path(out).mkdir(parents=True, exist_ok=True)
    train_adapters(
        model,
        pad,
        pairs,
        config.training,
        config.lora,
        config.model.path,
        RunFolder(out),
        shared=shared,
    )
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
                    "generated_tokens": sum(len(p.token_ids) for p in positives),
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
