"""The three fine-tuning types (lora.type: lora, dora, full) on the benchmark model, each in a
process of its own: seconds per training step and peak memory, and the fused model's logits
against the trained model's, in MLX and, where torch is installed, in transformers.

    python benchmarks/fine_tune_types.py --quick    # the quick model of benchmarks/run.py
    python benchmarks/fine_tune_types.py            # the full one

Every type trains the same pairs (the chat workload of run.py: 2 pairs a batch, prompts of
200-400 tokens, answers of 100-200, each prompt run once for both answers where the model
allows it) with its reference log-probs scored first, as a run does; `warmup` steps are left
out of the step time. No type holds a second copy of the model: the reference log-probs are
stored, so the peak is the weights, the trainable weights' gradients and Adam moments, and
the activations. The fused model is the trained one with
its adapters fused (for full fine-tuning, the trained weights themselves), saved as a
Hugging Face folder and loaded back by mlx_lm and by transformers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mipo_mlx  # noqa: F401  (first: it loads the system BLAS before mlx)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (what the benchmark scripts share)

TYPES = ("lora", "dora", "full")
LEARNING_RATE = {"lora": 1e-4, "dora": 1e-4, "full": 1e-5}


def worker(spec: dict) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mipo_mlx.core.config import LoraConfig, TrainingConfig
    from mipo_mlx.engine.batching import pack_pairs
    from mipo_mlx.engine.lora import attach_lora
    from mipo_mlx.engine.trainer import Hooks, fit, make_loss
    from mipo_mlx.publish.fuse import fuse

    harness.start_as_the_command()
    model, tokenizer = harness.load_model(spec)
    rows = json.loads(Path(spec["pairs"]).read_text())
    pairs, shared, _ = harness.scored_pairs(model, rows)  # packed as a run packs them
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    kind = spec["type"]
    lora = dict(harness.LORA)
    trainable = attach_lora(model, LoraConfig(type=kind, **lora), seed=0)
    config = TrainingConfig(
        batch_size=2, learning_rate=LEARNING_RATE[kind], warmup_fraction=0.0, min_lr_ratio=1.0
    )
    steps = spec["warmup"] + spec["steps"]
    times: list[float] = []

    class Timed(Hooks):
        def on_step(self, metrics):
            times.append(metrics["step_seconds"])

    def batches():
        k = 0
        while True:
            yield pack_pairs(pairs[k % len(pairs) : k % len(pairs) + 2], 0, shared)
            k += 2

    mx.reset_peak_memory()
    tic = time.perf_counter()
    last = fit(model, make_loss(config), batches(), steps, config, Timed())
    wall = time.perf_counter() - tic
    peak = mx.get_peak_memory()
    model.eval()
    ids = mx.array([pairs[0].prompt_ids + pairs[0].chosen_ids])
    trained = np.array(model(ids).astype(mx.float32))
    fuse(model, dequantize=True)
    fused_in_place = np.array(model(ids).astype(mx.float32))
    out = Path(spec["out"]) / kind
    from mlx_lm import load
    from mlx_lm.utils import save_config, save_model

    config_json = json.loads((Path(spec["model"]) / "config.json").read_text())
    save_model(out, model)
    save_config(config_json, out / "config.json")
    tokenizer.save_pretrained(str(out))
    reloaded, _ = load(str(out))
    mlx_gap = float(np.abs(np.array(reloaded(ids).astype(mx.float32)) - trained).max())
    np.save(out / "trained.npy", trained)
    return {
        "type": kind,
        "trainable": trainable,
        "weights_gb": weights / 1e9,
        "step_seconds": statistics.median(times[spec["warmup"] :]),
        "peak_gb": peak / 1e9,
        "wall_seconds": wall,
        "final_loss": last["loss"],
        "fused_in_place_gap": float(np.abs(fused_in_place - trained).max()),
        "mlx_gap": mlx_gap,
        "logit_scale": float(np.abs(trained).max()),
        "ids": np.array(ids).tolist(),
        "trained_logits": str(out / "trained.npy"),
        "folder": str(out),
    }


def transformers_gap(result: dict) -> float | None:
    """max |logits of the fused folder in transformers - the trained MLX model's|; None without
    torch."""
    try:
        import numpy as np
        import torch
        import transformers
    except ImportError:
        return None
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["folder"], dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor(result["ids"])).logits.numpy()
    return float(np.abs(logits - np.load(result["trained_logits"])).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smaller benchmark model")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "out"))
    harness.add_worker_arguments(parser)
    args = parser.parse_args()
    if harness.answered_as_worker(args, {"train": worker}):
        return 0
    mode = "quick" if args.quick else "full"
    out = Path(args.out)
    model = harness.build_model(out / f"model-{mode}", harness.MODELS[mode])
    work = Path(tempfile.mkdtemp(prefix="fine-tune-types-"))
    rows = harness.pair_rows(8, (200, 400), (100, 200), harness.MODELS[mode]["vocab"], 0)
    (work / "pairs.json").write_text(json.dumps(rows))
    results = []
    for kind in TYPES:
        spec = {
            "model": str(model),
            "pairs": str(work / "pairs.json"),
            "type": kind,
            "steps": args.steps,
            "warmup": args.warmup,
            "out": str(work),
        }
        result = harness.run_worker("train", spec)
        result["transformers_gap"] = transformers_gap(result)
        harness.say(f"{kind}: {result['step_seconds']:.2f} s/step, peak {result['peak_gb']:.2f} GB")
        results.append(result)
    print(
        "| lora.type | trainable parameters | s/step (median) | peak memory (GB; the model's "
        "weights) | fused vs trained, MLX | fused vs trained, transformers |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        hf = "n/a (no torch)" if r["transformers_gap"] is None else f"{r['transformers_gap']:.1e}"
        print(
            f"| {r['type']} | {r['trainable']:,} | {r['step_seconds']:.2f} "
            f"| {r['peak_gb']:.2f} ({r['weights_gb']:.2f}) "
            f"| {r['mlx_gap']:.1e} | {hf} |"
        )
    print(f"largest |logit| {max(r['logit_scale'] for r in results):.1f}")
    (out / f"fine_tune_types-{mode}.json").parent.mkdir(parents=True, exist_ok=True)
    (out / f"fine_tune_types-{mode}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
