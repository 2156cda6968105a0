"""Time to an improved model, end to end: from a prompt file to adapters and a before/after
table, mipo_mlx against the pipeline a user would assemble from the peers.

    python benchmarks/end_to_end.py --quick     # the quick model, 5 rounds (about 25 minutes)
    python benchmarks/end_to_end.py --rounds 3  # the full model (about 31 minutes)

Both sides start from the same prompt file (arithmetic and multiple-choice prompts of the
embedded data; labelled held-out prompts for the table), on the same random-init qwen2 model
of benchmarks/run.py, with the same number of pairs (one per prompt), the same optimizer steps
(one epoch at batch 2), LoRA rank 8 / scale 20 on every block, the same sampling and the same
answer lengths. A random-init model never ends an answer early, so every answer on both sides
is `max_tokens` long and both sides decode the same number of tokens per answer.

- `ours`: `python -m mipo_mlx.train` with evaluation, one process (random negatives: the other
  prompts' answers, so one generation per prompt).
- `peer`: three processes, as a user runs them:
  1. `mlx_lm.generate`, one prompt at a time: a chosen answer for each prompt and a fresh
     negative (an answer to another, random prompt); the pair file written by hand;
  2. mlx-lm-lora's DPO (`mlx_lm_lora.train`, train mode dpo, no fusing), with the device-info
     shim of benchmarks/run.py (a Metal-only key it reads);
  3. `mlx_lm.generate` on the evaluation prompts with the base, then with the adapters
     (`mlx_lm.load(..., adapter_path=...)`), and the accuracy table.

BLAS threads: both sides under the default policy (`adapt`): each process starts the thread
governor, which computes on the cores the machine leaves idle, here both. (With one BLAS
thread a process, the peer's pipeline took 25% longer.)

The sides run interleaved, ours then peer, for `--rounds` rounds. Wall time is from the first
process's start to the last one's end; peak memory is the largest peak RSS of a side's
processes (os.wait4). Stage times: the peer's from inside its processes, ours from when each
stage's file appears in the run folder. The ratio is the median over rounds of the round's
peer/ours, with its min-max. The last line is `end_to_end_speedup=<x> memory_ratio=<y>`
(memory_ratio: ours / peer, medians).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (what the benchmark scripts share)

DATA = harness.ROOT / "mipo_mlx" / "embedded" / "data"
# Prompts (= pairs), evaluation prompts, answer length, pairs per step; steps = one epoch.
WORKLOADS = {
    "quick": dict(prompts=32, evaluate=16, max_tokens=64, batch=2),
    "full": dict(prompts=32, evaluate=16, max_tokens=64, batch=2),  # the model is larger
}
SAMPLING = dict(temperature=0.7, top_p=0.9)  # the pairs' answers
EVAL_SAMPLING = dict(temperature=0.1, top_p=0.9)  # the table's answers (mipo_mlx's default)
LEARNING_RATE = 1e-5
# Ours: the run folder's files, in the order the stages write them -> the stage that ends there
OUR_STAGES = (
    ("config.yaml", "load"),
    ("eval_base.json", "evaluate base"),
    ("responses.chosen.jsonl", "generate"),
    ("pairs.jsonl", "reference scores"),
    ("adapters.safetensors", "train"),
    ("eval.json", "evaluate adapters"),
)


# ---------------------------------------------------------------- inputs


def write_prompts(folder: Path, workload: dict) -> tuple[Path, Path]:
    """The first N labelled prompts (no requirements) of the embedded train and held-out files."""

    def labelled(path: Path, n: int) -> list[dict]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [r for r in rows if "answer" in r and "context" not in r]
        return rows[:n]

    folder.mkdir(parents=True, exist_ok=True)
    train, evaluate = folder / "prompts.jsonl", folder / "heldout.jsonl"
    rows = labelled(DATA / "train.jsonl", workload["prompts"])
    train.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    rows = labelled(DATA / "heldout.jsonl", workload["evaluate"])
    evaluate.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows)
    )
    return train, evaluate


# ---------------------------------------------------------------- processes


def measured(cmd: list[str], env: dict | None = None, timeout: float = 7200) -> dict:
    """Run one process: its wall time, its own peak RSS (from os.wait4, which reaps it) and the
    RESULT line it printed, if any."""
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        tic = time.perf_counter()
        started = time.time()
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=harness.ROOT,
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - tic
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    # ru_maxrss: kilobytes on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {
        "seconds": seconds,
        "started": started,
        "peak_rss_gb": usage.ru_maxrss * scale / 1e9,
        "result": harness.worker_result(stdout) or {},
        "stdout": stdout,
        "stderr": stderr,
    }


def worker_command(name: str, spec: dict) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--spec",
        json.dumps(spec),
    ]


# ---------------------------------------------------------------- ours: one command


def ours(spec: dict) -> dict:
    """`python -m mipo_mlx.train` with evaluation; stage times from the run folder's files."""
    folder = Path(spec["output"])
    w = spec["workload"]
    steps = w["prompts"] // w["batch"]
    settings = {
        "model.path": spec["model"],
        "data.prompts": spec["prompts"],
        "data.valid_fraction": 0,
        "generation.max_tokens": w["max_tokens"],
        "generation.temperature": SAMPLING["temperature"],
        "generation.top_p": SAMPLING["top_p"],
        "generation.truncated": "keep",  # a random-init model ends no answer
        "pairs.negatives": "random",
        "training.batch_size": w["batch"],
        "training.iters": steps,
        "training.learning_rate": LEARNING_RATE,
        "training.save_every": 0,
        "evaluation.prompts": spec["heldout"],
        "evaluation.limit": w["evaluate"],
        "evaluation.max_tokens": w["max_tokens"],
        "evaluation.temperature": EVAL_SAMPLING["temperature"],
        "evaluation.top_p": EVAL_SAMPLING["top_p"],
        "output.dir": str(folder),
        "output.overwrite": "true",
    }
    args = [x for key, value in settings.items() for x in (f"--{key}", str(value))]
    done = measured([sys.executable, "-m", "mipo_mlx.train", *args])
    stages, before = {}, done["started"]
    for name, stage in OUR_STAGES:
        at = (folder / name).stat().st_mtime
        stages[stage] = at - before
        before = at
    stages["report and exit"] = done["started"] + done["seconds"] - before
    table = (folder / "eval.md").read_text()
    return {
        "seconds": done["seconds"],
        "peak_rss_gb": done["peak_rss_gb"],
        "stages": stages,
        "progress": progress_seconds(done["stderr"]),
        "steps": steps,
        "pairs": sum(1 for _ in (folder / "pairs.jsonl").open()),
        "table": table,
    }


def progress_seconds(stderr: str) -> dict[str, float]:
    """Each progress bar's elapsed time at its last line (whole seconds): `answer (base)`,
    `PMI (base)`, `generate chosen`, `score reference`, `train`, ..."""
    found = {}
    for line in stderr.splitlines():
        m = re.match(r"(.+?) \|[# ]{20}\| (\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<", line)
        if m:
            h, mi, sec = int(m.group(4) or 0), int(m.group(5)), int(m.group(6))
            found[m.group(1)] = 3600 * h + 60 * mi + sec
    return found


# ---------------------------------------------------------------- the peer: three processes


def peer(spec: dict) -> dict:
    folder = Path(spec["output"])
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "data": str(folder / "data"), "adapters": str(folder / "adapters")}
    processes = {
        "pairs": measured(worker_command("peer_pairs", spec)),
        "dpo": measured(worker_command("peer_dpo", spec)),
        "evaluate": measured(worker_command("peer_evaluate", spec)),
    }
    stages = {}
    for name, p in processes.items():
        inner = p["result"]["stages"]
        stages.update({f"{name}: {k}": v for k, v in inner.items()})
        stages[f"{name}: start, load and exit"] = p["seconds"] - sum(inner.values())
    return {
        "seconds": sum(p["seconds"] for p in processes.values()),
        "peak_rss_gb": max(p["peak_rss_gb"] for p in processes.values()),
        "process_peak_rss_gb": {k: p["peak_rss_gb"] for k, p in processes.items()},
        "stages": stages,
        "steps": processes["dpo"]["result"]["steps"],
        "pairs": processes["pairs"]["result"]["pairs"],
        "table": processes["evaluate"]["result"]["table"],
    }


def chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def worker_peer_pairs(spec: dict) -> dict:
    """A chosen answer per prompt and a fresh negative (another prompt's answer), one
    `mlx_lm.generate` call at a time; the pair file mlx-lm-lora's DPO reads."""
    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(0)
    model, tokenizer = load(spec["model"])
    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts"]).open()]
    sampler = make_sampler(temp=SAMPLING["temperature"], top_p=SAMPLING["top_p"])
    max_tokens = spec["workload"]["max_tokens"]

    def answer(text: str) -> str:
        return generate(
            model, tokenizer, chat_prompt(tokenizer, text), max_tokens=max_tokens, sampler=sampler
        )

    stages = {}
    tic = time.perf_counter()
    chosen = [answer(p) for p in prompts]
    stages["chosen answers"] = time.perf_counter() - tic
    tic = time.perf_counter()
    rng = random.Random(0)
    others = [rng.choice([j for j in range(len(prompts)) if j != i]) for i in range(len(prompts))]
    rejected = [answer(prompts[j]) for j in others]
    stages["fresh negatives"] = time.perf_counter() - tic
    data = Path(spec["data"])
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
            for p, c, r in zip(prompts, chosen, rejected)
        )
    )
    return {"stages": stages, "pairs": len(prompts)}


def worker_peer_dpo(spec: dict) -> dict:
    """mlx-lm-lora's DPO from its command line's entry (`run`), no validation, no fusing."""
    import types

    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora import train as cli

    harness.peer_device_info_shim()
    w = spec["workload"]
    settings = {
        "model": spec["model"],
        "train": True,
        "train_mode": "dpo",
        "data": spec["data"],
        "batch_size": w["batch"],
        "iters": w["prompts"] // w["batch"],
        "learning_rate": LEARNING_RATE,
        "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
        "num_layers": -1,
        "adapter_path": spec["adapters"],
        "steps_per_report": 1,
        "save_every": 10**9,
        "fuse": False,
        "beta": 0.1,
        "dpo_cpo_loss_type": "sigmoid",
        "seed": 0,
    }
    args = vars(cli.build_parser().parse_args([]))
    args.update(settings)
    for key, value in cli.CONFIG_DEFAULTS.items():
        if args.get(key) is None:
            args[key] = value
    reports: list[float] = []

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(time.perf_counter())

    tic = time.perf_counter()
    cli.run(types.SimpleNamespace(**args), training_callback=Clock())
    total = time.perf_counter() - tic
    # Before the first step's report: loading the model and the reference, the dataset and
    # the first step (its compile); after it: the other steps and the adapters' save
    first = reports[0] - tic
    return {
        "stages": {"load, tokenize, first step": first, "other steps, save": total - first},
        "steps": len(reports),
    }


def accuracy(texts: list[str], answers: list[str]) -> float:
    """The label as the answer's last number or word (what a user would write)."""
    hits = 0
    for text, label in zip(texts, answers):
        words = re.findall(r"[A-Za-z0-9.]+", text)
        hits += bool(words) and words[-1].strip(".") == label
    return hits / len(texts)


def worker_peer_evaluate(spec: dict) -> dict:
    """The evaluation prompts answered by the base, then by base + adapters; accuracy and length."""
    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    rows = [json.loads(line) for line in Path(spec["heldout"]).open()]
    max_tokens = spec["workload"]["max_tokens"]
    stages, results = {}, {}
    for name, adapters in (("base", None), ("dpo", spec["adapters"])):
        tic = time.perf_counter()
        mx.random.seed(1234)  # the same draws for both
        model, tokenizer = load(spec["model"], adapter_path=adapters)
        sampler = make_sampler(temp=EVAL_SAMPLING["temperature"], top_p=EVAL_SAMPLING["top_p"])
        lengths, texts = [], []
        for r in rows:
            text = generate(
                model,
                tokenizer,
                chat_prompt(tokenizer, r["prompt"]),
                max_tokens=max_tokens,
                sampler=sampler,
            )
            texts.append(text)
            lengths.append(len(tokenizer.encode(text)))
        results[name] = {
            "accuracy": accuracy(texts, [r["answer"] for r in rows]),
            "length (tokens, re-encoded)": statistics.mean(lengths),
        }
        stages[f"{name} answers"] = time.perf_counter() - tic
    table = "| metric | base | dpo |\n| --- | --- | --- |\n" + "".join(
        f"| {m} | {results['base'][m]:.3f} | {results['dpo'][m]:.3f} |\n"
        for m in ("accuracy", "length (tokens, re-encoded)")
    )
    return {"stages": stages, "table": table}


WORKERS = {
    "peer_pairs": worker_peer_pairs,
    "peer_dpo": worker_peer_dpo,
    "peer_evaluate": worker_peer_evaluate,
}


# ---------------------------------------------------------------- the benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick model and workload")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (ours, peer)")
    parser.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "out"))
    harness.add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:  # every worker is a peer process: the same thread governor as ours
        harness.start_as_the_command()
    if harness.answered_as_worker(args, WORKERS):
        return 0

    if not harness.peer_installed("benchmarks/end_to_end.py"):
        return 2
    mode = "quick" if args.quick else "full"
    out = Path(args.out)
    folder = out / f"end_to_end-{mode}"
    workload = WORKLOADS[mode]
    started = time.perf_counter()
    model = harness.build_model(out / f"model-{mode}", harness.MODELS[mode])
    prompts, heldout = write_prompts(folder, workload)
    spec = {
        "model": str(model),
        "prompts": str(prompts),
        "heldout": str(heldout),
        "workload": workload,
    }
    sides = {"ours": ours, "peer": peer}
    rounds: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side, go in sides.items():
            result = go({**spec, "output": str(folder / side)})
            rounds[side].append(result)
            harness.say(
                f"round {r + 1}/{args.rounds}: {side:4s} {result['seconds']:7.1f} s, "
                f"peak {result['peak_rss_gb']:.2f} GB, {result['pairs']} pairs, "
                f"{result['steps']} steps"
            )
    report = summarize(mode, workload, rounds)
    (folder / "results.json").write_text(json.dumps(report, indent=1))
    (folder / "results.md").write_text(report["markdown"])
    harness.say(report["markdown"])
    harness.say(f"benchmark took {time.perf_counter() - started:.0f} s; results in {folder}")
    print(report["last_line"])
    return 0


def summarize(mode: str, workload: dict, rounds: dict[str, list[dict]]) -> dict:
    ratios = [p["seconds"] / o["seconds"] for o, p in zip(rounds["ours"], rounds["peer"])]
    memory = {
        side: statistics.median(r["peak_rss_gb"] for r in found) for side, found in rounds.items()
    }
    speedup = harness.summary(ratios)
    lines = [
        f"End to end, {mode} workload ({workload['prompts']} prompts = pairs, "
        f"{workload['prompts'] // workload['batch']} steps at batch {workload['batch']}, "
        f"{workload['evaluate']} evaluation prompts, answers of {workload['max_tokens']} tokens), "
        f"{len(ratios)} interleaved rounds.",
        "",
        "| side | stage | seconds (median [min, max] over rounds) |",
        "| --- | --- | --- |",
    ]
    for side, found in rounds.items():
        for stage in found[0]["stages"]:
            s = harness.summary([r["stages"][stage] for r in found])
            lines.append(
                f"| {side} | {stage} | {s['median']:.1f} [{s['min']:.1f}, {s['max']:.1f}] |"
            )
        for bar in found[0].get("progress", {}):  # ours' progress bars, in whole seconds
            s = harness.summary([r["progress"].get(bar, 0) for r in found])
            lines.append(
                f"| {side} | (progress bar: {bar}) | {s['median']:.0f} [{s['min']:.0f}, "
                f"{s['max']:.0f}] |"
            )
        s = harness.summary([r["seconds"] for r in found])
        lines.append(
            f"| {side} | **total** | **{s['median']:.1f}** [{s['min']:.1f}, {s['max']:.1f}] |"
        )
    lines += [
        "",
        "| side | peak RSS GB (median) |",
        "| --- | --- |",
        *(f"| {side} | {memory[side]:.2f} |" for side in rounds),
        "",
        f"end_to_end_speedup (peer / ours, per round): {speedup['median']:.2f} "
        f"[{speedup['min']:.2f}, {speedup['max']:.2f}]",
        "",
        "The last round's tables:",
        "",
        "ours (mipo_mlx's eval.md):",
        "",
        rounds["ours"][-1]["table"].strip(),
        "",
        "peer:",
        "",
        rounds["peer"][-1]["table"].strip(),
    ]
    return {
        "mode": mode,
        "workload": workload,
        "machine": harness.machine(),
        "rounds": rounds,
        "end_to_end_speedup": speedup,
        "ratios": ratios,
        "peak_rss_gb": memory,
        "markdown": "\n".join(lines) + "\n",
        "last_line": (
            f"end_to_end_speedup={speedup['median']:.2f} "
            f"memory_ratio={memory['ours'] / memory['peer']:.2f}"
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
