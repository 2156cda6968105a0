"""Generation of MIPO's pairs: mipo_mlx's batched generation against sequential `mlx_lm`
generation, and the batched sampler against one sampler per row, at 32k and 128k
vocabularies.

    python benchmarks/generation.py --quick      # the quick model, 3 rounds (minutes)
    python benchmarks/generation.py              # the quick and the full model, 5 rounds
    python benchmarks/generation.py --model full --vocab 32k --rounds 3 --sides sequential,ours

Sides, each in its own process, interleaved (A B C A B C ...) so that a slow spell of the
machine lands on every side, never on one alone:
- `sequential`: `mlx_lm.stream_generate` one prompt at a time, a positive and a fresh
  negative per prompt (what a user assembles today);
- `per_row`: mipo_mlx's batched generation with one seeded sampler per row (mlx-lm's
  `apply_top_p` and `categorical`, one row at a time: the previous sampler);
- `ours`: mipo_mlx's batched generation with the batched sampler (one partition for the
  whole batch, each row's draw from its own stream).
Each round gives a ratio per pair of sides; the report is the median ratio with its
min-max over rounds, and each side's median. The last line is
`generation_speedup_32k=<x> generation_speedup_128k=<y> sampler_speedup_32k=<z>
sampler_speedup_128k=<w>` (speedup: sequential / ours; sampler: per_row / ours).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mipo_mlx  # noqa: F401  (first: it loads the fast BLAS before mlx)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (what the benchmark scripts share)

VOCABS = {"32k": 32000, "128k": 128256}
SIDES = ("sequential", "per_row", "ours")


def per_row_sampler(temperature: float, top_p: float, seed: int):
    """The previous sampler: its own key, split once per token, one row at a time."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    state = {"key": mx.random.key(seed)}

    def sample(logprobs):  # (1, V) -> (1,)
        state["key"], key = mx.random.split(state["key"])
        return mx.random.categorical(apply_top_p(logprobs, top_p) * (1.0 / temperature), key=key)

    return sample


def per_row_generate(model, tokenizer, prompts, config) -> list[list[int]]:
    """mipo_mlx's generate() as it was, with one sampler per row (the lever under test)."""
    from mipo_mlx.engine.generation import batch_generator

    generator = batch_generator(model, tokenizer, config)
    samplers = [per_row_sampler(config.temperature, config.top_p, s) for s in range(len(prompts))]
    uids = generator.insert(
        prompts, max_tokens=[config.max_tokens] * len(prompts), samplers=samplers
    )
    tokens = {uid: [] for uid in uids}
    while responses := generator.next_generated():
        for r in responses:
            tokens[r.uid].append(r.token)
    generator.close()
    return [tokens[uid] for uid in uids]


def worker(spec: dict) -> dict:
    """One side's generation in this process: seconds per pair and peak memory."""
    import mlx.core as mx

    from mipo_mlx.core.config import GenerationConfig

    if spec["side"] != "per_row":
        return harness.worker_generate(spec)
    model, tokenizer = harness.load_model(spec)
    prompts = [r["prompt_ids"] for r in json.loads(Path(spec["pairs"]).read_text())]
    config = GenerationConfig(
        temperature=0.7, top_p=0.9, max_tokens=spec["max_tokens"], batch_size=spec["batch_size"]
    )
    mx.reset_peak_memory()
    tic = time.perf_counter()
    responses = per_row_generate(model, tokenizer, prompts, config)
    seconds = time.perf_counter() - tic
    tokens = sum(len(r) for r in responses)
    return {
        "seconds": seconds,
        "pairs": len(prompts),
        "generated_tokens": tokens,
        "seconds_per_pair": seconds / len(prompts),
        "tokens_per_second": tokens / seconds,
        "peak_active_gb": mx.get_peak_memory() / 1e9,
    }


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick model, 3 rounds")
    parser.add_argument("--rounds", type=int, help="rounds of every side (default 3 / 5)")
    parser.add_argument("--model", choices=("quick", "full"), help="only this model")
    parser.add_argument("--vocab", choices=tuple(VOCABS), help="only this vocabulary")
    parser.add_argument(
        "--sides",
        default=",".join(SIDES),
        help="comma-separated sides (sequential, per_row, ours); ours is always run",
    )
    parser.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "out"))
    harness.add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if harness.answered_as_worker(args, {"generate": worker}):
        return 0
    rounds = args.rounds or (3 if args.quick else 5)
    sides = [x for x in SIDES if x in args.sides.split(",") or x == "ours"]
    models = ("quick",) if args.quick else (args.model,) if args.model else ("quick", "full")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report, last = {}, []
    for mode in models:
        n_prompts, max_tokens = (8, 128) if mode == "quick" else (16, 160)
        for label, vocab in VOCABS.items():
            if args.vocab and label != args.vocab:
                continue
            shape = {**harness.MODELS[mode], "vocab": vocab}
            model_dir = harness.build_model(out / f"model-{mode}-{label}", shape)
            pairs = out / f"pairs-generate-{mode}-{label}.json"
            pairs.write_text(json.dumps(harness.pair_rows(n_prompts, (200, 400), (1, 2), vocab, 3)))
            spec = {"model": str(model_dir), "pairs": str(pairs), "max_tokens": max_tokens}
            spec["batch_size"] = n_prompts
            times = {side: [] for side in sides}
            for r in range(rounds):
                for side in sides:
                    result = run_side({**spec, "side": side})
                    times[side].append(result["seconds_per_pair"])
                    harness.say(
                        f"{mode} {label} round {r + 1}: {side:10s} {times[side][-1]:.2f} s/pair"
                    )
            entry = report[f"{mode}/{label}"] = {"seconds_per_pair": times}
            line = f"{mode} {label}: s/pair " + ", ".join(f"{s} {spread(times[s])}" for s in sides)
            for name, slow in (("speedup", "sequential"), ("sampler_speedup", "per_row")):
                if slow in times:
                    entry[name] = [s / o for s, o in zip(times[slow], times["ours"])]
                    line += f"; {slow}/ours {spread(entry[name])}"
                    prefix = "generation_speedup" if name == "speedup" else name
                    suffix = label if mode == "quick" else f"{mode}_{label}"
                    last.append(f"{prefix}_{suffix}={statistics.median(entry[name]):.2f}")
            harness.say(line)
    (out / f"generation-{'-'.join(models)}.json").write_text(json.dumps(report, indent=1))
    print(" ".join(sorted(last)))
    return 0


def run_side(spec: dict) -> dict:
    """One side in a fresh process of this script (its own peak memory, no warm caches)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, __file__, "--worker", "generate", "--spec", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    result = harness.worker_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"worker {spec['side']} failed:\n{proc.stderr[-2000:]}")
    return result


if __name__ == "__main__":
    sys.exit(main())
