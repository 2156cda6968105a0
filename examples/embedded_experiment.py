"""Does MIPO help the embedded model? Base vs MIPO vs SFT-on-own-answers, over seeds.

  python examples/embedded_experiment.py --output runs/experiment   # ~30 min on 2 cores

1. Learning rates are chosen on the *valid* split (seed 0) for MIPO and for the
   SFT baseline (the paper's: SFT on the model's own positives, same pairs, same
   steps); the held-out split is never used for a choice.
2. With the chosen rates, each method runs with seeds 0, 1, 2 (generation, pair,
   training and evaluation seeds) and is evaluated on the held-out split.
3. Prints a Markdown table of mean and standard deviation; writes results.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from mipo_mlx.config import resolve
from mipo_mlx.embedded import default_config_path
from mipo_mlx.pipeline import run

METHODS = {"mipo": "sigmoid", "sft": "sft"}


def one_run(
    out: Path,
    loss: str,
    lr: float,
    seed: int,
    split: str,
    iters: int | None,
    limits: tuple[int | None, int | None] = (None, None),
) -> dict:
    config = resolve(str(default_config_path()), {})
    config.data = replace(config.data, limit=limits[0] or config.data.limit)
    config.evaluation = replace(config.evaluation, limit=limits[1] or config.evaluation.limit)
    config.training = replace(config.training, loss=loss, learning_rate=lr, seed=seed, iters=iters)
    config.generation = replace(config.generation, seed=seed)
    config.pairs = replace(config.pairs, seed=seed)
    config.evaluation = replace(
        config.evaluation,
        seed=seed,
        plots=False,
        prompts=config.evaluation.prompts.replace("heldout", split),
    )
    config.output = replace(config.output, dir=str(out), overwrite=True)
    run(config)
    return json.loads((out / "eval.json").read_text())


def choose_rate(
    root: Path, loss: str, rates: list[float], iters: int | None, limits
) -> tuple[float, dict]:
    scores = {}
    for lr in rates:
        result = one_run(root / f"select-{loss}-{lr:g}", loss, lr, 0, "valid", iters, limits)
        scores[lr] = result["mipo"]["accuracy"]
        print(
            f"[valid] {loss} lr={lr:g}: accuracy {scores[lr]:.3f} "
            f"(base {result['base']['accuracy']:.3f})"
        )
    return max(scores, key=scores.get), scores


def summary(rows: list[dict], key: str) -> str:
    values = np.array([r[key] for r in rows])
    return (
        f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
        if len(values) > 1
        else f"{values.mean():.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="runs/experiment")
    parser.add_argument("--rates", default="3e-5,1e-4,3e-4,1e-3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--iters", type=int, default=None, help="steps per run (default: one epoch)"
    )
    parser.add_argument(
        "--train-limit", type=int, help="use only N training prompts (a quick trial)"
    )
    parser.add_argument("--eval-limit", type=int, help="evaluate on only N prompts (a quick trial)")
    args = parser.parse_args()
    limits = (args.train_limit, args.eval_limit)
    root = Path(args.output)
    rates = [float(r) for r in args.rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    chosen, selection = {}, {}
    for method, loss in METHODS.items():
        chosen[method], selection[method] = choose_rate(root, loss, rates, args.iters, limits)
    results = {"base": [], "mipo": [], "sft": []}
    for seed in seeds:
        for method, loss in METHODS.items():
            result = one_run(
                root / f"{method}-seed{seed}",
                loss,
                chosen[method],
                seed,
                "heldout",
                args.iters,
                limits,
            )
            results[method].append(result["mipo"])
            if method == "mipo":
                results["base"].append(result["base"])
            print(
                f"[heldout] seed {seed} {method}: accuracy {result['mipo']['accuracy']:.3f}, "
                f"PMI {result['mipo']['pmi_mean']:.2f} (base {result['base']['accuracy']:.3f}, "
                f"{result['base']['pmi_mean']:.2f})"
            )
    report = {
        "chosen_rates": chosen,
        "selection_on_valid": selection,
        "seeds": seeds,
        "heldout": results,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(report, indent=2))
    print(
        f"\nchosen on valid: MIPO lr {chosen['mipo']:g}, SFT lr {chosen['sft']:g}; "
        f"held-out, seeds {seeds}:\n"
    )
    print("| model | accuracy | PMI (nats) | length (tokens) | distinct-2 |")
    print("| --- | --- | --- | --- | --- |")
    for name, rows in results.items():
        print(
            f"| {name} | {summary(rows, 'accuracy')} | {summary(rows, 'pmi_mean')} | "
            f"{summary(rows, 'length_mean')} | {summary(rows, 'distinct_2')} |"
        )


if __name__ == "__main__":
    main()
