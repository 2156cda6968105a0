"""Does MIPO make the embedded model better? Each family of the embedded prompts, over seeds.

  python examples/embedded_experiment.py --output runs/experiment
  python examples/embedded_experiment.py --output runs/experiment --select-only  # step 1 only

Two families, each run on its own rows of the shipped prompt files:
- personalization (tasks.requirements): a question and the user's requirements; the
  score is compliance (of well-formed answers), with the well-formed rate beside it.
  Arms: base (prompting); MIPO with `no_context`, `random_context` and `random`
  negatives; SFT on the model's own with-requirement answers (the `no_context` arm's
  pairs and steps); and rounds 1, 2, 3 of the `no_context` arm (round 1 is that arm).
- math (tasks.synthetic: arithmetic and multiple choice); the score is accuracy.
  Arms: base; MIPO with `random` and `incomplete` negatives; SFT (the `random` arm's pairs).

1. On the *valid* split, seed 0, learning rates are chosen for MIPO (`no_context` for
   personalization, `random` for math) and for SFT, from --rates. Personalization picks
   the highest compliance among rates that keep the well-formed rate within 3 points of
   the base's; math the highest accuracy. The other MIPO arms of a family use its MIPO
   rate. The round count is then chosen on valid at personalization's MIPO rate. The
   held-out split is never used for a choice.
2. With the chosen rates, every arm runs with seeds 0, 1, 2 (generation, pairs,
   training and evaluation seeds) and is evaluated on the held-out split.
3. Prints Markdown tables: mean ± sd over seeds, and each arm's paired difference to the
   base (same seed, same held-out prompts) with its 95% t-interval over seeds; writes
   results.json.

Runs go two at a time (--workers), each in its own process, its log beside its folder.
A run already done with the same resolved settings is read back, not run again, so an
interrupted experiment continues where it stopped. Step 1 took 27 minutes on 2
CPU cores (two runs at a time) and the held-out step 66 more: 93 minutes in all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import yaml

from mipo_mlx.config import resolve, to_dict
from mipo_mlx.embedded import HERE, default_config_path
from mipo_mlx.files import write_jsonl
from mipo_mlx.pipeline import run

# family -> (rows of the shipped files, score, arms: name -> (negatives, loss, rounds))
FAMILIES = {
    "personalization": {
        "score": "compliance",
        "mipo": "mipo no_context",
        "arms": {
            "mipo no_context": ("no_context", "sigmoid"),
            "mipo random_context": ("random_context", "sigmoid"),
            "mipo random": ("random", "sigmoid"),
            "sft": ("no_context", "sft"),
        },
    },
    "math": {
        "score": "accuracy",
        "mipo": "mipo random",
        "arms": {
            "mipo random": ("random", "sigmoid"),
            "mipo incomplete": ("incomplete", "sigmoid"),
            "sft": ("random", "sft"),
        },
    },
}
WELL_FORMED_SLACK = 0.03
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def family_files(root: Path, data: Path) -> dict[str, dict[str, Path]]:
    """Each family's rows of the train, valid and heldout files in `data`, in root/data."""
    files: dict[str, dict[str, Path]] = {family: {} for family in FAMILIES}
    for split in ("train", "valid", "heldout"):
        rows = [json.loads(line) for line in (data / f"{split}.jsonl").open()]
        for family in FAMILIES:
            path = root / "data" / f"{family}-{split}.jsonl"
            mine = [r for r in rows if (r.get("task") == "requirements") == (family != "math")]
            write_jsonl(path, mine)
            files[family][split] = path
    return files


def one_run(out: Path, files: dict[str, Path], split: str, args, **settings) -> dict:
    """One pipeline run of the embedded default on a family's files; its eval.json (a run
    already done with the same settings is read back, not run again)."""
    overrides = {
        "data.prompts": str(files["train"]),
        "evaluation.prompts": str(files[split]),
        "evaluation.plots": False,
        "output.dir": str(out),
        "output.overwrite": True,
    }
    if args.iters:
        overrides["training.iters"] = args.iters
    if args.train_limit:
        overrides["data.limit"] = args.train_limit
    if args.eval_limit:
        overrides["evaluation.limit"] = args.eval_limit
    seed = settings.pop("seed")
    for key in ("generation.seed", "pairs.seed", "training.seed", "evaluation.seed"):
        overrides[key] = seed
    overrides.update(settings)
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    config = resolve(str(default_config_path()), dict(overrides))
    settings_now = json.loads(json.dumps(to_dict(config)))
    if (out / "eval.json").is_file() and (out / "settings.json").is_file():
        if json.loads((out / "settings.json").read_text()) == settings_now:
            return json.loads((out / "eval.json").read_text())  # this very run, done before
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            run(config)
    (out / "settings.json").write_text(json.dumps(settings_now, indent=1))
    return json.loads((out / "eval.json").read_text())


def run_job(job: dict) -> dict:
    return one_run(**job)


def run_all(jobs: list[dict], workers: int) -> list[dict]:
    """The jobs' eval.json, in order; `workers` processes at a time, longest jobs first."""
    order = sorted(
        range(len(jobs)),
        key=lambda i: (-jobs[i]["training.rounds"], "math" in jobs[i]["out"].name),
    )
    results: list[dict] = [{}] * len(jobs)
    if workers <= 1:
        for i in order:
            results[i] = run_job(jobs[i])
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(run_job, jobs[i]): i for i in order}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            print(f"  done: {jobs[futures[future]]['out']}", flush=True)
    return results


def arm_settings(negatives: str, loss: str, lr: float, rounds: int = 1) -> dict:
    return {
        "pairs.negatives": negatives,
        "training.loss": loss,
        "training.learning_rate": lr,
        "training.rounds": rounds,
    }


def rounds_of(result: dict) -> list[dict]:
    """The adapters' results, round by round."""
    if "mipo" in result:
        return [result["mipo"]]
    count = sum(key.startswith("round ") for key in result)
    return [result[f"round {k}"] for k in range(1, count + 1)]


def acceptable(family: str, result: dict, base: dict) -> bool:
    if family == "math":
        return True
    return result["well_formed_rate"] >= base["well_formed_rate"] - WELL_FORMED_SLACK


def candidates_of(family: str, lr: float, result: dict, label: str) -> list[dict]:
    """Each round's valid score, printed, and whether it keeps the well-formed rate."""
    spec, base, out = FAMILIES[family], result["base"], []
    for k, adapted in enumerate(rounds_of(result), start=1):
        ok = acceptable(family, adapted, base)
        score = adapted[spec["score"]]
        print(
            f"[valid] {family} {label} lr={lr:g} round {k}: {spec['score']} {score:.3f} "
            f"(base {base[spec['score']]:.3f})"
            + ("" if ok else " - well-formed rate fell more than 3 points: not eligible"),
            flush=True,
        )
        out.append({"lr": lr, "rounds": k, "score": score, "eligible": ok})
    return out


def best(candidates: list[dict]) -> dict:
    """The best eligible score; the fewer rounds, then the lower rate, on a tie."""
    eligible = [c for c in candidates if c["eligible"]] or candidates
    return max(eligible, key=lambda c: (c["score"], -c["rounds"], -c["lr"]))


def metrics_of(family: str, result: dict) -> dict:
    keys = ["accuracy", "pmi_mean"]
    if family != "math":
        keys = ["compliance", "well_formed_rate", "compliance_win_rate", "pmi_context_mean"]
    return {k: result[k] for k in keys if result.get(k) is not None}


def mean_sd(values: list[float]) -> str:
    v = np.array(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def paired(values: list[float], base: list[float]) -> str:
    """Mean paired difference to the base over seeds, with its 95% t-interval."""
    d = np.array(values, dtype=float) - np.array(base, dtype=float)
    if len(d) < 2:
        return f"{d.mean():+.3f}"
    half = T975.get(len(d) - 1, 1.96) * d.std(ddof=1) / math.sqrt(len(d))
    return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"


def table(family: str, arms: dict[str, list[dict]]) -> str:
    keys = list(metrics_of(family, arms["base"][0]))
    if family != "math":
        keys.insert(2, "compliance_win_rate")
    score = FAMILIES[family]["score"]
    head = f"| {family} | " + " | ".join(keys) + f" | {score} - base (95% CI) |"
    lines = [head, "|" + " --- |" * (len(keys) + 2)]
    for name, rows in arms.items():
        cells = [mean_sd([r[k] for r in rows]) if k in rows[0] else "-" for k in keys]
        diff = (
            "-"
            if name == "base"
            else paired([r[score] for r in rows], [b[score] for b in arms["base"]])
        )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="runs/experiment")
    parser.add_argument(
        "--data", default=str(HERE / "data"), help="the prompt files (default: the shipped ones)"
    )
    parser.add_argument("--rates", default="1e-4,3e-4,1e-3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help="run only these families",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the rounds arm")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, each a process")
    parser.add_argument(
        "--select-only", action="store_true", help="stop after the choices on the valid split"
    )
    parser.add_argument("--iters", type=int, help="steps per run (default: one epoch)")
    parser.add_argument("--train-limit", type=int, help="use only N training prompts (a trial)")
    parser.add_argument("--eval-limit", type=int, help="evaluate on only N prompts (a trial)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another setting for every run, e.g. generation.max_tokens=16 (a trial)",
    )
    args = parser.parse_args()
    root = Path(args.output)
    rates = [float(r) for r in args.rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    files = family_files(root, Path(args.data))
    unknown = set(args.families.split(",")) - set(FAMILIES)
    if unknown:
        parser.error(f"--families: unknown {sorted(unknown)}; choose from {list(FAMILIES)}")
    families = {f: FAMILIES[f] for f in args.families.split(",")}

    # 1. On valid, seed 0: each family's MIPO and SFT rates (one round each).
    selection = {
        (family, method, lr): {
            "out": root / "select" / f"{family}-{method}-{lr:g}",
            "files": files[family],
            "split": "valid",
            "args": args,
            "seed": 0,
            **arm_settings(*spec["arms"][spec["mipo"] if method == "mipo" else "sft"], lr),
        }
        for family, spec in families.items()
        for method in ("mipo", "sft")
        for lr in rates
    }
    done = dict(zip(selection, run_all(list(selection.values()), args.workers)))
    chosen: dict[str, dict] = {}
    for family, spec in families.items():
        chosen[family] = {}
        for method in ("mipo", "sft"):
            label = spec["mipo"] if method == "mipo" else "sft"
            candidates = [
                c
                for lr in rates
                for c in candidates_of(family, lr, done[family, method, lr], label)
            ]
            chosen[family][method] = {**best(candidates), "candidates": candidates}

    if args.select_only:
        (root / "chosen.json").write_text(json.dumps(chosen, indent=2))
        for family in families:
            for method, pick in chosen[family].items():
                print(f"chosen on valid: {family} {method} lr {pick['lr']:g}")
        return

    # 2. The rounds at personalization's MIPO rate, on valid; and every arm on held-out.
    jobs: dict[tuple, dict] = {}
    if "personalization" in families:
        spec, lr = FAMILIES["personalization"], chosen["personalization"]["mipo"]["lr"]
        jobs["rounds"] = {
            "out": root / "select" / f"personalization-rounds-{lr:g}",
            "files": files["personalization"],
            "split": "valid",
            "args": args,
            "seed": 0,
            **arm_settings(*spec["arms"][spec["mipo"]], lr, args.rounds),
        }
    for family, spec in families.items():
        for seed in seeds:
            for arm, (negatives, loss) in spec["arms"].items():
                lr = chosen[family]["sft" if loss == "sft" else "mipo"]["lr"]
                rounds = args.rounds if arm == "mipo no_context" else 1
                jobs[family, seed, arm] = {
                    "out": root / "heldout" / f"{family}-{arm.replace(' ', '_')}-seed{seed}",
                    "files": files[family],
                    "split": "heldout",
                    "args": args,
                    "seed": seed,
                    **arm_settings(negatives, loss, lr, rounds),
                }
    done = dict(zip(jobs, run_all(list(jobs.values()), args.workers)))
    if "rounds" in done:
        lr = chosen["personalization"]["mipo"]["lr"]
        candidates = candidates_of("personalization", lr, done["rounds"], "mipo no_context")
        chosen["personalization"]["rounds"] = {**best(candidates), "candidates": candidates}

    results: dict[str, dict[str, list[dict]]] = {}
    for family, spec in families.items():
        arms: dict[str, list[dict]] = {"base": []}
        for seed in seeds:
            for arm in spec["arms"]:
                result = done[family, seed, arm]
                if arm == spec["mipo"]:
                    arms["base"].append(metrics_of(family, result["base"]))
                for k, adapted in enumerate(rounds_of(result), start=1):
                    name = arm if k == 1 else f"{arm}, round {k}"
                    arms.setdefault(name, []).append(metrics_of(family, adapted))
        results[family] = arms

    report = {"chosen_on_valid": chosen, "seeds": seeds, "heldout": results}
    name = "results.json" if len(families) == len(FAMILIES) else f"results-{args.families}.json"
    (root / name).write_text(json.dumps(report, indent=2))
    for family in families:
        mipo, sft = chosen[family]["mipo"], chosen[family]["sft"]
        rounds = chosen[family].get("rounds", {}).get("rounds", 1)
        print(
            f"\n{family}: chosen on valid: MIPO lr {mipo['lr']:g} ({rounds} round(s) best), "
            f"SFT lr {sft['lr']:g}; held-out, seeds {seeds}:\n"
        )
        print(table(family, results[family]))


if __name__ == "__main__":
    main()
