"""mipo_mlx against the hand-made peer pipeline, measured side by side on this machine.

    python benchmarks/run.py --quick     # the smaller model (about 20 minutes on 2 CPU cores)
    python benchmarks/run.py             # the full run behind BENCHMARKS.md

The peer pipeline is what a user would assemble today: `mlx_lm.generate` one prompt
at a time (a positive and a fresh negative per prompt), then mlx-lm-lora's DPO
trainer (a second full model as the reference, chosen and rejected in separate
forwards, the reference recomputed every step). Both sides get the same random-init
model of a real architecture (qwen2, built here), the same pairs, batch, LoRA rank
and layers, and the same BLAS. Every measurement runs in a fresh subprocess, so
peak memory is that side's alone. The compared sides run interleaved, A B A B ... for
`--rounds` rounds (5), and a ratio is the median over rounds of the round's ratio, printed
with its min-max. The last line printed is
`train_speedup=<x> memory_ratio=<y> generation_speedup=<z> mfu=<w>`, with the medians.

mlx-lm-lora (pip install mlx-lm-lora; 5.10.2 measured) reads the Metal-only key
`max_recommended_working_set_size` from `mx.device_info()` and stops with a
KeyError on other backends. The shim in harness.py (`peer_device_info_shim`) adds that key
(the physical memory) for the peer's process only; nothing else of it is changed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mipo_mlx  # noqa: F401  (first: it loads the system BLAS before mlx)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    LORA,
    MODELS,
    ROOT,
    add_worker_arguments,
    answered_as_worker,
    build_model,
    governed_threads,
    interleaved,
    load_model,
    machine,
    memory_sample,
    pair_rows,
    peer_device_info_shim,
    peer_installed,
    ratio,
    run_worker,
    say,
    scored_pairs,
    start_as_the_command,
    summary,
    worker_generate,
)

# Workloads: pairs per batch, prompt and response length ranges (tokens).
WORKLOADS = {
    "quick": {"chat": (2, (200, 400), (100, 200)), "personalization": (2, (500, 600), (100, 200))},
    "full": {"chat": (4, (200, 400), (100, 200)), "personalization": (4, (500, 600), (100, 200))},
}
# 4-bit runs: MLX's CPU quantized matmul is ~40x slower
QUANT_WORKLOAD = (1, (200, 300), (100, 150))


# ---------------------------------------------------------------- setup (parent process)


# ---------------------------------------------------------------- workers (one per subprocess)


def worker_matmul(spec: dict) -> dict:
    """The machine's float32 matmul peak: best of square sizes, median of repeats, on every
    BLAS thread ours may compute on (the governor is given time to find the idle cores)."""
    import mlx.core as mx

    start_as_the_command()
    warm = mx.random.normal((1024, 1024))
    tic = time.perf_counter()
    while time.perf_counter() - tic < 1.5:  # the governor's two samples
        mx.eval(warm @ warm)
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a, b, a @ b)
        times = []
        for _ in range(5):
            tic = time.perf_counter()
            mx.eval(a @ b)
            times.append(time.perf_counter() - tic)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return {"gflops": best}


def linear_parameters(model) -> tuple[int, int]:
    """(parameters of the linear layers in the blocks, parameters of the LM head), unpacked."""
    import mlx.nn as nn

    def size(module) -> int:
        if isinstance(module, nn.QuantizedLinear):
            return module.weight.shape[0] * module.weight.shape[1] * 32 // module.bits
        return module.weight.size

    body = sum(
        size(m)
        for layer in model.layers
        for _, m in layer.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    )
    head = (
        size(model.lm_head)
        if hasattr(model, "lm_head")
        else model.args.vocab_size * model.args.hidden_size
    )
    return body, head


def worker_train(spec: dict) -> dict:
    """Time training steps of one side on the same batch; report step times and peak memory."""
    import mlx.core as mx

    start_as_the_command()
    mx.reset_peak_memory()
    memory: dict = {}
    model, _ = load_model(spec)
    pairs_rows = json.loads(Path(spec["pairs"]).read_text())
    body, head = linear_parameters(model)
    if spec["side"] == "peer":
        result = peer_train(spec, model, pairs_rows, memory)
    else:
        result = ours_train(spec, model, pairs_rows, memory)
    memory_sample(memory)
    result.update(
        blas_threads=governed_threads(),
        peak_active_gb=mx.get_peak_memory() / 1e9,
        peak_total_gb=max(memory["peak_total"], mx.get_peak_memory()) / 1e9,
        body_params=body,
        head_params=head,
    )
    return result


def ours_train(spec: dict, model, rows: list[dict], memory: dict) -> dict:
    import mlx.core as mx

    from mipo_mlx.core.config import LoraConfig, TrainingConfig
    from mipo_mlx.engine.batching import pack_pairs
    from mipo_mlx.engine.logps import pair_logps
    from mipo_mlx.engine.lora import adapters_disabled, attach_lora
    from mipo_mlx.engine.trainer import Hooks, fit, make_loss

    variant = spec["variant"]
    config = TrainingConfig(
        batch_size=len(rows),
        learning_rate=1e-5,
        grad_checkpoint=variant == "checkpoint",
        compile=variant != "eager",
        shared_prompt="off" if variant == "unshared" else "auto",
        warmup_fraction=0.0,
    )
    pairs, shared, reference_seconds = scored_pairs(model, rows, config.shared_prompt)
    attach_lora(model, LoraConfig(**LORA), seed=0)
    batch = pack_pairs(pairs, 0, shared)

    def batches():
        while True:
            # The reference forward every step (adapters off, same weights)
            if variant == "recompute":
                with adapters_disabled(model):
                    chosen, rejected = pair_logps(model, batch.tree())
                    mx.eval(chosen, rejected)
                batch.reference_chosen, batch.reference_rejected = chosen, rejected
            yield batch

    times: list[float] = []

    class Timed(Hooks):
        def on_step(self, metrics):
            times.append(metrics["step_seconds"])
            memory_sample(memory)

    steps = spec["warmup"] + spec["steps"]
    fit(model, make_loss(config), batches(), steps, config, Timed())
    # Response positions: the only ones through the head when shared
    scored = int(batch.owners.sum().item())
    return {
        "step_seconds": times[spec["warmup"] :],
        "shared": shared,
        "tokens": batch.n_tokens,
        "head_tokens": scored if shared else batch.n_tokens,
        "reference_seconds": reference_seconds,
    }


def peer_train(spec: dict, model, rows: list[dict], memory: dict) -> dict:
    """mlx-lm-lora's own DPO trainer (`train_dpo`), as its CLI sets it up: the reference is a
    second full model, loaded separately; LoRA with the same rank, scale and layers."""
    import tempfile

    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    peer_device_info_shim()
    reference, _ = load_model(spec)
    model.freeze()
    linear_to_lora_layers(
        model, len(model.layers), {k: LORA[k] for k in ("rank", "scale", "dropout")}
    )
    dataset = [
        {
            "chosen": r["prompt_ids"] + r["chosen_ids"],
            "rejected": r["prompt_ids"] + r["rejected_ids"],
            "chosen_prompt_length": len(r["prompt_ids"]),
            "rejected_prompt_length": len(r["prompt_ids"]),
        }
        for r in rows
    ]
    times: list[float] = []

    class Timer(TrainingCallback):
        def on_train_loss_report(self, info):
            times.append(1.0 / info["iterations_per_second"])
            memory_sample(memory)

    steps = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOTrainingArgs(
            batch_size=len(rows),
            iters=steps,
            steps_per_report=1,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=4096,
            adapter_file=str(Path(tmp) / "a.safetensors"),
            grad_checkpoint=spec["variant"] == "checkpoint",
            beta=0.1,
        )
        train_dpo(
            model,
            reference,
            optim.AdamW(learning_rate=1e-5),
            dataset,
            None,
            args=args,
            training_callback=Timer(),
            loss_type="sigmoid",
        )
    tokens = sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    )
    return {"step_seconds": times[spec["warmup"] :], "tokens": tokens, "head_tokens": tokens}


def worker_cli(spec: dict) -> dict:
    """`python -m mipo_mlx.train` end to end on the embedded default (shortened), timed."""
    from mipo_mlx.core.backend import blas_library

    tic = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", *spec["args"]],
        capture_output=True,
        text=True,
        cwd=spec["cwd"],
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return {"seconds": time.perf_counter() - tic, "blas": blas_library()}


WORKERS = {
    "matmul": worker_matmul,
    "train": worker_train,
    "generate": worker_generate,
    "cli": worker_cli,
}


# ---------------------------------------------------------------- the benchmark (parent process)


HEADLINE = ("peer-default", "ours-default")  # the sides whose ratio is the headline


def train_flops(result: dict) -> float:
    """4 x parameters x tokens: forward (2) + activation gradients (2); the frozen base needs no
    weight gradients. Blocks count every real token they process, the LM head only the
    positions it is applied to. Attention scores and the LoRA matmuls are not counted."""
    return 4 * (
        result["body_params"] * result["tokens"] + result["head_params"] * result["head_tokens"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the smaller model and fewer repeats (minutes)"
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "out"), help="folder for results.json and plots"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds of each compared pair of sides"
    )
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if answered_as_worker(args, WORKERS):
        return 0

    if not peer_installed("benchmarks/run.py"):
        return 2
    mode = "quick" if args.quick else "full"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = MODELS[mode]
    started = time.perf_counter()
    say(f"building the {mode} model ({shape})")
    model_dir = build_model(out / f"model-{mode}", shape)
    report: dict = {"mode": mode, "machine": machine(), "model": shape, "runs": {}}
    steps, warmup = (3, 1) if args.quick else (4, 1)  # the first step compiles
    rounds = args.rounds

    report["matmul_gflops"] = run_worker("matmul", {})["gflops"]
    say(f"matmul peak: {report['matmul_gflops']:.1f} GFLOP/s (float32)")

    workloads = dict(WORKLOADS[mode])
    variants = ["default", "unshared", "recompute"] + ([] if args.quick else ["checkpoint"])
    for name, (batch, prompt_range, response_range) in workloads.items():
        pairs_file = out / f"pairs-{name}-{mode}.json"
        pairs_file.write_text(
            json.dumps(pair_rows(batch, prompt_range, response_range, shape["vocab"], seed=1))
        )
        base = {"model": str(model_dir), "pairs": str(pairs_file), "steps": steps, "warmup": warmup}
        runs = interleaved(
            {key: {**base, "side": key.split("-")[0], "variant": "default"} for key in HEADLINE},
            rounds,
            f"train {name}",
            lambda r: statistics.median(r["step_seconds"]),
            "s/step",
        )
        for variant in variants[1:]:  # the levers, once each (BENCHMARKS.md, "Levers")
            key = f"ours-{variant}"
            runs[key] = run_worker("train", {**base, "side": "ours", "variant": variant})
            r = runs[key]
            say(
                f"train {name:16s} {key:16s} {statistics.median(r['step_seconds']):7.2f} s/step  "
                f"peak {r['peak_total_gb']:.2f} GB"
            )
        report["runs"][f"train/{name}"] = runs
    if not args.quick:
        batch, prompt_range, response_range = QUANT_WORKLOAD
        pairs_file = out / f"pairs-q4-{mode}.json"
        pairs_file.write_text(
            json.dumps(pair_rows(batch, prompt_range, response_range, shape["vocab"], seed=2))
        )
        base = {
            "model": str(model_dir),
            "pairs": str(pairs_file),
            "steps": 3,
            "warmup": 1,
            "bits": 4,
        }
        runs = {}
        for side in ("peer", "ours"):
            runs[f"{side}-default"] = run_worker(
                "train", {**base, "side": side, "variant": "default"}
            )
            r = runs[f"{side}-default"]
            say(
                f"train 4-bit {side}: {statistics.median(r['step_seconds']):.2f} s/step  "
                f"peak {r['peak_total_gb']:.2f} GB"
            )
        report["runs"]["train/chat-4bit"] = runs

    n_prompts, max_tokens = (8, 128) if args.quick else (16, 160)
    pairs_file = out / f"pairs-generate-{mode}.json"
    pairs_file.write_text(
        json.dumps(pair_rows(n_prompts, (200, 400), (1, 2), shape["vocab"], seed=3))
    )
    spec = {"model": str(model_dir), "pairs": str(pairs_file), "max_tokens": max_tokens}
    gen = interleaved(
        {side: {**spec, "side": side, "batch_size": n_prompts} for side in ("sequential", "ours")},
        rounds,
        "generate",
        lambda r: r["seconds_per_pair"],
        "s/pair",
        worker="generate",
    )
    report["generation"] = gen

    if not args.quick:
        report["blas"] = blas_end_to_end(out)

    finish(report, out)
    say(f"benchmark took {time.perf_counter() - started:.0f} s; results in {out / 'results.json'}")
    print(report["last_line"])
    return 0


def blas_end_to_end(out: Path) -> dict:
    """The embedded default job, shortened, with the system OpenBLAS and with MLX's bundled BLAS."""
    args = [
        "--evaluation.prompts",
        "null",
        "--training.iters",
        "10",
        "--generation.max_tokens",
        "32",
        "--output.overwrite",
        "true",
    ]
    result = {}
    for label, env in (("openblas", {}), ("bundled", {"MIPO_MLX_BLAS": "off"})):
        spec = {"args": [*args, "--output", str(out / f"cli-{label}")], "cwd": str(ROOT)}
        run = run_worker("cli", spec, env=env, timeout=1800)
        result[label] = run["seconds"]
        say(
            f"python -m mipo_mlx.train (embedded, 10 steps) with {label} BLAS ({run['blas']}): "
            f"{run['seconds']:.1f} s"
        )
    return result


def finish(report: dict, out: Path) -> None:
    """Ratios, MFU, the last line, results.json and a plot."""
    peak = report["matmul_gflops"] * 1e9
    ratios = {}
    for name, runs in report["runs"].items():
        peer, ours = runs["peer-default"], runs["ours-default"]
        ratios[name] = {
            "train_speedup": ratio(peer, ours) if "rounds" in peer else None,
            "memory_ratio": ours["peak_total_gb"] / peer["peak_total_gb"],
        }
        if ratios[name]["train_speedup"] is None:  # the 4-bit pair: one pass each
            one = statistics.median(peer["step_seconds"]) / statistics.median(ours["step_seconds"])
            ratios[name]["train_speedup"] = {"median": one, "min": one, "max": one}
        for r in runs.values():
            r["summary"] = summary(r.get("round_seconds") or r["step_seconds"])
            r["mfu"] = train_flops(r) / r["summary"]["median"] / peak
    gen = report["generation"]
    generation = ratio(gen["sequential"], gen["ours"])
    report["generation_speedup"] = generation
    chat = ratios["train/chat"]
    mfu = report["runs"]["train/chat"]["ours-default"]["mfu"]
    report["ratios"] = ratios
    report["last_line"] = (
        f"train_speedup={chat['train_speedup']['median']:.2f} "
        f"memory_ratio={chat['memory_ratio']:.2f} "
        f"generation_speedup={generation['median']:.2f} mfu={mfu:.2f}"
    )
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    plot(report, out / "benchmarks.png")


def markdown(report: dict) -> str:
    lines = [
        "| workload | run | step s (median [min, max], n) | peak GB | tokens/step | MFU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in report["runs"].items():
        for key, r in runs.items():
            s = r["summary"]
            lines.append(
                f"| {name} | {key} | "
                f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}], {s['n']} | "
                f"{r['peak_total_gb']:.2f} | {r['tokens']} | {100 * r['mfu']:.1f}% |"
            )
    lines += [
        "",
        "| generation | s/pair (median [min, max] over rounds) | tokens/s | generated tokens "
        "| peak GB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for side, g in report["generation"].items():
        s = summary(g["round_seconds"])
        lines.append(
            f"| {side} | {s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}] | "
            f"{g['tokens_per_second']:.0f} | {g['generated_tokens']} | {g['peak_active_gb']:.2f} |"
        )
    g = report["generation_speedup"]
    lines += [
        "",
        f"generation_speedup (sequential / ours, per round): {g['median']:.2f} "
        f"[{g['min']:.2f}, {g['max']:.2f}]",
        "",
        "| workload | train_speedup (peer / ours, per round: median [min, max]) | memory_ratio |",
        "| --- | --- | --- |",
    ]
    for name, r in report["ratios"].items():
        t = r["train_speedup"]
        lines.append(
            f"| {name} | {t['median']:.2f} [{t['min']:.2f}, {t['max']:.2f}] | "
            f"{r['memory_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot (pip install 'mipo_mlx[plot]')")
        return
    names = list(report["runs"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, metric, label in (
        (axes[0], "time", "seconds per training step"),
        (axes[1], "memory", "peak GB"),
    ):
        keys = sorted({k for runs in report["runs"].values() for k in runs})
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            values = [
                (
                    statistics.median(report["runs"][n][key]["step_seconds"])
                    if metric == "time"
                    else report["runs"][n][key]["peak_total_gb"]
                )
                if key in report["runs"][n]
                else 0
                for n in names
            ]
            ax.bar([i + j * width for i in range(len(names))], values, width, label=key)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(names))], [n.split("/")[1] for n in names]
        )
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    gen = report["generation"]
    axes[2].bar(
        list(gen),
        [statistics.median(g["round_seconds"]) for g in gen.values()],
        color=["tab:gray", "tab:blue"],
    )
    axes[2].set_ylabel("seconds per pair (generation)")
    fig.suptitle(f"mipo_mlx vs mlx-lm-lora DPO + sequential mlx_lm.generate ({report['mode']} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
