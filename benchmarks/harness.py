"""What the benchmark scripts share: the benchmark models (real mlx-lm architectures, random
weights, built here), random pair rows, workers in fresh processes (each measurement's peak
memory is its own), sides run interleaved round by round with their ratios, the peer's
device-info shim, and the machine's description. The scripts beside it (run.py,
end_to_end.py, generation.py, profile_step.py, ...) are thin: their workloads and report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mipo_mlx  # noqa: F401  (first: it loads the system BLAS before mlx)

ROOT = Path(__file__).resolve().parent.parent


# Model shapes: qwen2 blocks (GQA, q/k/v biases), untied head, 32k vocabulary.
MODELS = {
    "quick": dict(
        hidden_size=512, layers=6, intermediate_size=1408, heads=8, kv_heads=2, vocab=32000
    ),
    "full": dict(
        hidden_size=768, layers=8, intermediate_size=2048, heads=12, kv_heads=4, vocab=32000
    ),
}


LORA = dict(rank=8, scale=20.0, dropout=0.0, num_layers=-1)


def build_model(folder: Path, shape: dict) -> Path:
    """A random-init qwen2 model with a 32k byte-level BPE tokenizer (trained on random words,
    so that every id decodes)."""
    from mipo_mlx.engine.toy import build_model_folder

    if (folder / "config.json").exists():
        return folder
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    corpus = [
        " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(50))
        for _ in range(8000)
    ]
    return build_model_folder(
        folder,
        architecture="qwen2",
        hidden_size=shape["hidden_size"],
        layers=shape["layers"],
        intermediate_size=shape["intermediate_size"],
        heads=shape["heads"],
        kv_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        tie_word_embeddings=False,
        corpus=corpus,
    )


def pair_rows(n: int, prompt_range, response_range, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))]

    return [
        {
            "prompt_ids": ids(*prompt_range),
            "chosen_ids": ids(*response_range),
            "rejected_ids": ids(*response_range),
        }
        for _ in range(n)
    ]


def scored_pairs(model, rows: list[dict], shared_prompt: str = "auto"):
    """`rows` (pair_rows' dicts) as pairs with their reference log-probs, scored by `model` with
    the packing a run uses (training.shared_prompt): (pairs, shared, seconds the scoring took)."""
    from mipo_mlx.data.pair_file import Pair
    from mipo_mlx.engine.probes import use_shared_prompt
    from mipo_mlx.engine.scoring import score_pairs

    pairs = [
        Pair(messages=[], chosen="", rejected="", negatives="random", source=i, **row)
        for i, row in enumerate(rows)
    ]
    shared = use_shared_prompt(model, pairs, shared_prompt, 0)
    tic = time.perf_counter()
    for pair, (c, r) in zip(pairs, score_pairs(model, pairs, 0, len(pairs), shared)):
        pair.reference_logps = {"chosen": c, "rejected": r}
    return pairs, shared, time.perf_counter() - tic


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden arguments a benchmark script's worker processes are started with."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)


def answered_as_worker(args: argparse.Namespace, workers: dict) -> bool:
    """In a worker process: run the named worker on its spec, print its RESULT line, True."""
    if not args.worker:
        return False
    print("RESULT " + json.dumps(workers[args.worker](json.loads(args.spec))), flush=True)
    return True


def worker_result(stdout: str) -> dict | None:
    """The last RESULT line a worker printed, parsed; None if it printed none."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else None


def run_worker(kind: str, spec: dict, env: dict | None = None, timeout: int = 3600) -> dict:
    """Run one measurement in a fresh Python process; its last stdout line is JSON."""
    cmd = [
        sys.executable,
        str(Path(sys.argv[0]).resolve()),  # the script that runs: its workers answer
        "--worker",
        kind,
        "--spec",
        json.dumps(spec),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    result = worker_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"worker {kind} {spec.get('side', '')} failed:\n{proc.stderr[-3000:]}")
    return result


def memory_sample(state: dict) -> None:
    import mlx.core as mx

    state["peak_total"] = max(
        state.get("peak_total", 0), mx.get_active_memory() + mx.get_cache_memory()
    )


def start_as_the_command() -> None:
    """Every side computes as `python -m mipo_mlx.train` does: its start (`require_mlx`) runs
    the thread governor of the default policy, which computes on the cores the machine leaves
    idle. The peer gets it too: the same BLAS and threads on both sides (one thread a process
    made the peer's end-to-end pipeline 25% slower, BENCHMARKS.md)."""
    from mipo_mlx.core.backend import require_mlx

    require_mlx()


def governed_threads() -> list[int]:
    """The BLAS thread count the governor chose at each of its samples in this process (to
    tell a slow round on fewer threads from one slow for another reason); [] without one."""
    from mipo_mlx.core.backend import start_governor

    governor = start_governor()
    return list(governor.counts) if governor is not None else []


def load_model(spec: dict):
    from mlx_lm import load

    from mipo_mlx.engine.model import quantize

    model, tokenizer, config = load(spec["model"], return_config=True)
    if spec.get("bits"):
        quantize(model, config, spec["bits"], 64)
    model.freeze()
    return model, tokenizer


def peer_device_info_shim() -> None:
    """mlx-lm-lora reads mx.device_info()['max_recommended_working_set_size'], a key only Metal
    has. Add it (physical memory) so its trainer runs on other backends."""
    import mlx.core as mx

    original = mx.device_info

    def device_info():
        info = dict(original())
        info.setdefault(
            "max_recommended_working_set_size",
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        )
        return info

    mx.device_info = device_info


def worker_generate(spec: dict) -> dict:
    """Pair generation: ours batched (positives reused as `random` negatives: N generations), or
    the sequential baseline (mlx_lm.stream_generate per prompt, a positive and a fresh negative)."""
    import mlx.core as mx

    start_as_the_command()
    mx.reset_peak_memory()
    model, tokenizer = load_model(spec)
    prompts = [r["prompt_ids"] for r in json.loads(Path(spec["pairs"]).read_text())]
    max_tokens, n = spec["max_tokens"], len(prompts)
    tic = time.perf_counter()
    if spec["side"] == "ours":
        from mipo_mlx.core.config import GenerationConfig
        from mipo_mlx.engine.generation import generate
        from mipo_mlx.stages.answers import derangement

        config = GenerationConfig(
            temperature=0.7, top_p=0.9, max_tokens=max_tokens, batch_size=spec["batch_size"]
        )
        responses = generate(model, tokenizer, prompts, config, streams=list(range(n)))
        derangement(list(range(n)), seed=0)  # the negatives: other prompts' answers, no generation
        generated = sum(len(r.token_ids) for r in responses)
    else:
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        sampler = make_sampler(temp=0.7, top_p=0.9)
        generated = 0
        for i, prompt in enumerate(prompts):
            # The positive, then a negative from another prompt
            for source in (prompt, prompts[(i + 1) % n]):
                for response in stream_generate(
                    model, tokenizer, source, max_tokens=max_tokens, sampler=sampler
                ):
                    last = response
                generated += last.generation_tokens
    seconds = time.perf_counter() - tic
    return {
        "seconds": seconds,
        "pairs": n,
        "generated_tokens": generated,
        "seconds_per_pair": seconds / n,
        "tokens_per_second": generated / seconds,
        "peak_active_gb": mx.get_peak_memory() / 1e9,
    }


def interleaved(specs: dict, rounds: int, label: str, seconds, unit: str, worker="train") -> dict:
    """Each side of `specs` once per round, in turn (A B A B ...), each in its own process, so
    that a slow spell of the machine lands on both sides and not on one: a ratio of two
    single passes was seen to move from 3.51x to 1.99x an hour apart. Returns each side's
    first result with `rounds` (every round's result) and `round_seconds` added."""
    results: dict = {key: [] for key in specs}
    for r in range(rounds):
        for key, spec in specs.items():
            results[key].append(run_worker(worker, spec))
            say(f"{label} round {r + 1}/{rounds}: {key:14s} {seconds(results[key][-1]):.2f} {unit}")
    return {
        key: {**found[0], "rounds": found, "round_seconds": [seconds(x) for x in found]}
        for key, found in results.items()
    }


def ratio(slow: dict, fast: dict) -> dict:
    """The median over rounds of slow/fast, paired by round, with its spread."""
    values = [a / b for a, b in zip(slow["round_seconds"], fast["round_seconds"])]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def peer_installed(script: str) -> bool:
    """Whether mlx-lm-lora (the peer side) is installed; if not, one line saying how."""
    import importlib.util

    if importlib.util.find_spec("mlx_lm_lora") is not None:
        return True
    print(
        f"{script}: the peer side needs mlx-lm-lora; install it with `pip install mlx-lm-lora`",
        file=sys.stderr,
    )
    return False


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> dict:
    import mlx.core as mx

    from mipo_mlx.core.backend import blas_library

    versions = {}
    for package in ("mlx", "mlx-lm", "mlx-lm-lora", "mipo_mlx"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = "not installed"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": str(mx.default_device()),
        "blas": blas_library(),
        "python": platform.python_version(),
        "versions": versions,
    }
