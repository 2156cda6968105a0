"""Does MIPO make the embedded model better, and keep it better over rounds? Each family of the
embedded prompts, over seeds, every choice made on the valid split.

  python examples/embedded_experiment.py --output runs/experiment              # every step
  python examples/embedded_experiment.py --output runs/experiment --step select

Families, each on its own rows:
- personalization (tasks.requirements): score compliance (of well-formed answers);
- problems (tasks.synthetic: arithmetic and multiple choice): score accuracy.
Training prompts are the shipped ones followed by more of the same draw from the train split
(training.fresh_prompts gives each round its own 512); valid and held-out are the shipped rows.

Step 1, select (valid, seed 0; every round evaluated on valid, no guard). Personalization:
today's recipe (`no_context`, lr 3e-4, one epoch of 512 prompts a round), each lever added
to it alone (drop identical pairs, NLL weight 1, best of 4 chosen, fresh prompts each round),
all four together at lr 3e-4 and 2e-3; 4 rounds each. The recipe chosen is the
(settings, rounds) with the highest valid compliance whose well-formed rate is within 3
points of the base's. Problems: `random` negatives with the chosen recipe's levers (one
sample a prompt, for time) at the two rates, 2 rounds each; the rate and round count with the
best valid accuracy are chosen.
These runs also show how the label-free scores track the labelled ones over rounds and rates.

Step 2, held-out (seeds 0, 1, 2, run once). Personalization: base; SFT on own answers (lr 1e-4,
chosen on valid when this experiment was first run); today's recipe, 1 and 2 rounds; the new
recipe with the guard on the valid rows; best of 4 at inference, reranked by the base's own
context PMI. Problems: base; SFT (lr 1e-3, likewise); MIPO `random` and `incomplete` with the
recipe's levers (one sample a prompt) at the rate and round count chosen on valid, with the
guard; majority-vote pairs (4 samples, ScPO) likewise.

Step 3, fresh draw: the chosen recipe and today's 2 rounds again on new draws of the
personalization train and held-out items (a seed used nowhere else, items of the shipped
held-out file left out), run seed 3.

Runs go --workers at a time, each its own process, its log beside its folder; a run already
done with the same settings is read back, not run again. The workers share this machine: each
is told so (MIPO_MLX_LOCAL_RUNS=--workers): the BLAS thread policy (MIPO_MLX_THREADS) gives each
at most its share of the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import yaml

from mipo_mlx.core.config import to_dict
from mipo_mlx.core.files import write_jsonl
from mipo_mlx.core.settings import resolve
from mipo_mlx.embedded import HERE, default_config_path

REPORT_ONLY = False  # --report: read the runs done, run nothing
PER_ROUND = 512  # training prompts a round answers
ROUNDS = 4
MATH_ROUNDS = 2  # the problems' rounds on valid (fewer, for time)
RATES = (3e-4, 2e-3)  # the levers together, and the problems, at these rates
FRESH_SEED = 9137  # the fresh draw's items; used nowhere else
FRESH_RUN_SEED = 3  # the fresh draw's run seed
WELL_FORMED_SLACK = 0.03
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
SCORE = {"personalization": "compliance", "problems": "accuracy"}
# Settings of the embedded default that the no-argument run's recipe sets, held at what this
# experiment was designed with, so that every arm says what it changes
PINNED = {
    "training.learning_rate": 3e-4,
    "training.nll_weight": 0.0,
    "training.rounds": 1,
    "training.fresh_prompts": False,
    "pairs.samples": 1,
    "pairs.drop_identical": True,
    "guard.prompts": None,
    "guard.limit": 200,
}

TODAY = {
    "pairs.negatives": "no_context",
    "training.learning_rate": 3e-4,
    "pairs.drop_identical": False,
    "training.nll_weight": 0.0,
    "pairs.samples": 1,
    "training.fresh_prompts": False,
}
LEVERS = {
    "drop identical": {"pairs.drop_identical": True},
    "nll 1": {"training.nll_weight": 1.0},
    "best of 4": {"pairs.samples": 4},
    "fresh prompts": {"training.fresh_prompts": True},
}
ALL_LEVERS = {k: v for lever in LEVERS.values() for k, v in lever.items()}
# SFT on the model's own answers, at the rates chosen on valid when this experiment was first
# run (identical pairs kept: their chosen answers still carry SFT's gradient)
SFT = {
    "personalization": {
        "pairs.negatives": "no_context",
        "training.loss": "sft",
        "training.learning_rate": 1e-4,
        "pairs.drop_identical": False,
    },
    "problems": {
        "pairs.negatives": "random",
        "training.loss": "sft",
        "training.learning_rate": 1e-3,
        "pairs.drop_identical": False,
    },
}


# ---------------------------------------------------------------- data


def family_files(root: Path, data: Path) -> dict[str, dict[str, Path]]:
    """Each family's train (PER_ROUND x ROUNDS prompts), valid and held-out files."""
    from mipo_mlx.data.tasks import requirements as req
    from mipo_mlx.data.tasks import synthetic as syn

    files: dict[str, dict[str, Path]] = {"personalization": {}, "problems": {}}
    for split in ("valid", "heldout"):
        rows = [json.loads(line) for line in (data / f"{split}.jsonl").open()]
        for family in files:
            mine = [r for r in rows if (r.get("task") == "requirements") == (family != "problems")]
            files[family][split] = root / "data" / f"{family}-{split}.jsonl"
            write_jsonl(files[family][split], mine)
    n = PER_ROUND * ROUNDS
    drawn = {
        "personalization": [i.row() for i in req.items("train", n, seed=7)],
        "problems": [p.row() for p in syn.problems("train", n, seed=7)],
    }
    shipped = [json.loads(line) for line in (data / "train.jsonl").open()]
    for family, rows in drawn.items():
        mine = [r for r in shipped if (r.get("task") == "requirements") == (family != "problems")]
        assert rows[: len(mine)] == mine, "the shipped prompts begin the draw"
        files[family]["train"] = root / "data" / f"{family}-train.jsonl"
        write_jsonl(files[family]["train"], rows)
    return files


def fresh_files(root: Path, data: Path) -> dict[str, Path]:
    """New draws of personalization train and held-out items, none in the shipped files."""
    from mipo_mlx.data.tasks import requirements as req

    shipped = {
        json.dumps([r["prompt"], r["context"]])
        for split in ("train", "valid", "heldout")
        for r in map(json.loads, (data / f"{split}.jsonl").open())
        if r.get("task") == "requirements"
    }
    out = {}
    for split, n in (("train", PER_ROUND * ROUNDS), ("heldout", 200)):
        rows = [i.row() for i in req.items(split, n + 600, seed=FRESH_SEED)]
        rows = [r for r in rows if json.dumps([r["prompt"], r["context"]]) not in shipped][:n]
        out[split] = root / "data" / f"fresh-personalization-{split}.jsonl"
        write_jsonl(out[split], rows)
    return out


# ---------------------------------------------------------------- runs


def one_run(out: Path, train: Path, evaluate: Path, seed: int, settings: dict) -> dict:
    """One pipeline run of the embedded default; {'eval': eval.json, 'guard': guard.json}.
    A run already done with the same settings is read back."""
    from mipo_mlx.pipeline import evaluate as evaluate_only
    from mipo_mlx.pipeline import run

    overrides = {
        **PINNED,
        "data.prompts": str(train),
        "data.limit": PER_ROUND,
        "evaluation.prompts": str(evaluate),
        "evaluation.plots": False,
        "output.dir": str(out),
        "output.overwrite": True,
        **{k: seed for k in ("generation.seed", "pairs.seed", "training.seed", "evaluation.seed")},
        **{k: v for k, v in settings.items() if k != "evaluate_only"},
    }
    config = resolve(str(default_config_path()), dict(overrides))
    now = json.loads(json.dumps(to_dict(config)))
    now["evaluate_only"] = bool(settings.get("evaluate_only"))
    done = out / "done.json"
    if done.is_file() and json.loads(done.read_text())["settings"] == now:
        return json.loads(done.read_text())["result"]
    if REPORT_ONLY:
        return None
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            if settings.get("evaluate_only"):
                report = {"base": evaluate_only(config, None)["base"]}
            else:
                run(config)
                report = json.loads((out / "eval.json").read_text())
    guard = out / "guard.json"
    result = {"eval": report, "guard": json.loads(guard.read_text()) if guard.is_file() else None}
    done.write_text(json.dumps({"settings": now, "result": result}))
    return result


def run_job(job: dict) -> dict:
    return one_run(**job)


def set_rounds(rounds: int) -> None:
    global ROUNDS, MATH_ROUNDS
    ROUNDS, MATH_ROUNDS = rounds, min(MATH_ROUNDS, rounds)


def with_extra(jobs: dict, extra: dict) -> dict:
    """The jobs with `extra` settings (a trial's) on top of their own."""
    return {k: {**job, "settings": {**job["settings"], **extra}} for k, job in jobs.items()}


def cached(jobs: dict) -> dict:
    """--report: the jobs already done with the same settings, read back; the rest left out."""
    results = {k: one_run(**job) for k, job in jobs.items()}
    return {k: v for k, v in results.items() if v is not None}


def run_all(jobs: dict, workers: int) -> dict:
    """The jobs' results by key; `workers` processes at a time, the longest first (a job whose
    folder another process holds goes last). `workers` processes at once on this machine are
    that many local runs to the BLAS thread policy (MIPO_MLX_THREADS; under the default each
    computes on at most its share of the cores, fewer while other work takes them, one where
    the share is one core), unless MIPO_MLX_LOCAL_RUNS is
    set: two runs with OpenBLAS's own threads on two cores each took about 9x as long as one
    alone (BENCHMARKS.md, "BLAS threads on a machine that is not idle")."""
    if REPORT_ONLY:
        return cached(jobs)
    order = sorted(jobs, key=lambda k: (held(jobs[k]["out"]), -weight(jobs[k]["settings"])))
    os.environ.setdefault("MIPO_MLX_LOCAL_RUNS", str(workers))  # inherited at spawn
    context = multiprocessing.get_context("spawn")
    results = {}
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(run_job, jobs[k]): k for k in order}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            print(f"  done: {jobs[futures[future]]['out']}", flush=True)
    return results


def held(folder: Path) -> bool:
    """Whether another process holds the run folder's lock now."""
    import fcntl

    lock = folder / ".lock"
    if not lock.exists():
        return False
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def weight(settings: dict) -> float:
    return settings.get("training.rounds", 1) * settings.get("pairs.samples", 1)


def rounds_of(report: dict) -> list[dict]:
    """The adapters' results, round by round."""
    if "mipo" in report:
        return [report["mipo"]]
    count = sum(key.startswith("round ") for key in report)
    return [report[f"round {k}"] for k in range(1, count + 1)]


def kept_result(result: dict) -> tuple[int, dict]:
    """The round the guard kept (0: the base) and its held-out results."""
    report, kept = result["eval"], result["guard"]["kept"]
    k = 0 if kept == "the base" else int(kept.split()[-1])
    return k, report["base"] if k == 0 else rounds_of(report)[k - 1]


# ---------------------------------------------------------------- step 1: select on valid


def select_jobs(root: Path, files: dict, chosen_levers: dict | None) -> dict:
    p, jobs = files["personalization"], {}

    def job(family, name, settings):
        f = files[family]
        rounds = ROUNDS if family == "personalization" else MATH_ROUNDS
        jobs[family, name] = {
            "out": root / "select" / f"{family}-{name.replace(' ', '_')}",
            "train": f["train"],
            "evaluate": f["valid"],
            "seed": 0,
            "settings": {"training.rounds": rounds, "guard.keep": "last", **settings},
        }

    del p
    job("personalization", "today", TODAY)
    for lever, extra in LEVERS.items():
        job("personalization", f"today + {lever}", {**TODAY, **extra})
    for lr in RATES:
        job(
            "personalization",
            f"all levers lr {lr:g}",
            {**TODAY, **ALL_LEVERS, "training.learning_rate": lr},
        )
    if chosen_levers is not None:  # one sample a prompt here, for time
        for lr in RATES:
            settings = {
                **chosen_levers,
                "pairs.samples": 1,
                "pairs.negatives": "random",
                "training.learning_rate": lr,
            }
            job("problems", f"random lr {lr:g}", settings)
    return jobs


def eligible_rounds(report: dict) -> list[tuple[int, float, bool]]:
    base = report["base"]
    return [
        (k, r["compliance"], r["well_formed_rate"] >= base["well_formed_rate"] - WELL_FORMED_SLACK)
        for k, r in enumerate(rounds_of(report), start=1)
    ]


def choose_recipe(done: dict) -> tuple[str, int]:
    """The personalization (settings, rounds) with the best eligible valid compliance; on a
    tie the fewer rounds."""
    best = max(
        (
            (score, -k, name)
            for (family, name), result in done.items()
            if family == "personalization"
            for k, score, ok in eligible_rounds(result["eval"])
            if ok
        ),
        default=None,
    )
    if best is None:
        raise SystemExit("no personalization setting kept the well-formed rate on valid")
    return best[2], -best[1]


def label_free_tracking(done: dict) -> dict:
    """How each label-free candidate tracks the labelled score over the rounds and rates of
    step 1, per family: Spearman's rank correlation over every (settings, round) and the base,
    and what the guard would keep with it: in each run, the round (the base included) with the
    best candidate score, its labelled score and well-formed rate, and the best labelled
    score any round of that run had (the guard's job is to pick within a run)."""
    out = {}
    for family, score in SCORE.items():
        runs = {
            name: [result["eval"]["base"], *rounds_of(result["eval"])]
            for (f, name), result in done.items()
            if f == family
        }
        points = [p for rows in runs.values() for p in rows]
        if len(points) < 3:
            continue
        context = "pmi_context_mean" if family == "personalization" else "pmi_mean"
        candidates = {
            "PMI": lambda p, c=context: p[c],
            "PMI - KL (the guard's label-free score)": lambda p: p["objective"],
            "PMI - 0.1 KL (DPO's own weight)": lambda p, c=context: p[c] - 0.1 * p["kl_mean"],
        }
        labelled = [p[score] for p in points]
        out[family] = {"points": len(points), "spearman": {}, "kept": {}}
        for name, value in candidates.items():
            out[family]["spearman"][name] = spearman([value(p) for p in points], labelled)
            kept = {}
            for run, rows in runs.items():
                k = max(range(len(rows)), key=lambda i: (value(rows[i]), -i))
                best = max(range(len(rows)), key=lambda i: (rows[i][score], -i))
                kept[run] = {
                    "round": k,
                    score: rows[k][score],
                    "well_formed_rate": rows[k].get("well_formed_rate"),
                    "best round": best,
                    f"best {score}": rows[best][score],
                }
            out[family]["kept"][name] = kept
        out[family]["kept"]["labels (the guard with labels)"] = {
            run: {"round": max(range(len(rows)), key=lambda i: (rows[i][score], -i))}
            for run, rows in runs.items()
        }
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [np.argsort(np.argsort(v, kind="stable"), kind="stable") for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


# ---------------------------------------------------------------- step 2: held-out


def heldout_jobs(root: Path, files: dict, recipe: dict, math_recipe: dict, seeds) -> dict:
    jobs = {}
    for seed in seeds:
        for family, arms in (
            (
                "personalization",
                {
                    "sft": SFT["personalization"],
                    "today": {**TODAY, "training.rounds": 2},
                    "recipe": recipe,
                    "best of 4 at inference": {"evaluate_only": True, "evaluation.best_of": 4},
                },
            ),
            (
                "problems",
                {
                    "sft": SFT["problems"],
                    "mipo random": {**math_recipe, "pairs.negatives": "random"},
                    "mipo incomplete": {**math_recipe, "pairs.negatives": "incomplete"},
                    "majority vote": {
                        **math_recipe,
                        "pairs.negatives": "majority_vote",
                        "pairs.samples": 4,
                    },
                },
            ),
        ):
            f = files[family]
            for arm, settings in arms.items():
                if arm in ("recipe", "mipo random", "mipo incomplete", "majority vote"):
                    settings = {**settings, "guard.prompts": str(f["valid"])}
                jobs[family, seed, arm] = {
                    "out": root / "heldout" / f"{family}-{arm.replace(' ', '_')}-seed{seed}",
                    "train": f["train"],
                    "evaluate": f["heldout"],
                    "seed": seed,
                    "settings": settings,
                }
    return jobs


def metrics_of(family: str, result: dict) -> dict:
    keys = ["accuracy", "pmi_mean"]
    if family == "personalization":
        keys = ["compliance", "well_formed_rate", "compliance_win_rate", "pmi_context_mean"]
    return {k: result.get(k) for k in keys}


def arms_table(family: str, done: dict, seeds) -> tuple[dict, str]:
    """Each arm's metrics by seed, and the Markdown table: mean ± sd over seeds and the paired
    difference to the base of the same seeds (every run of a seed answers the same held-out
    prompts with the same base first)."""
    arms: dict[str, dict[int, dict]] = {"base": {}}
    kept_rounds: dict[str, dict[int, int]] = {}
    for (f, seed, arm), result in sorted(done.items(), key=lambda kv: kv[0][1]):
        if f != family:
            continue
        report = result["eval"]
        arms["base"].setdefault(seed, metrics_of(family, report["base"]))
        if arm == "sft":
            arms.setdefault("sft", {})[seed] = metrics_of(family, rounds_of(report)[0])
        elif arm == "best of 4 at inference":
            arms.setdefault(arm, {})[seed] = metrics_of(family, report["base"])
        elif result["guard"] is None:  # today's recipe: its rounds
            for k, r in enumerate(rounds_of(report), start=1):
                arms.setdefault(f"today's recipe, {k} round(s)", {})[seed] = metrics_of(family, r)
        else:
            k, kept = kept_result(result)
            name = "new recipe with the guard" if arm == "recipe" else f"{arm} with the guard"
            arms.setdefault(name, {})[seed] = metrics_of(family, kept)
            kept_rounds.setdefault(name, {})[seed] = k
            for j, r in enumerate(rounds_of(report), start=1):
                arms.setdefault(f"{arm}, round {j} (no guard)", {})[seed] = metrics_of(family, r)
    score = SCORE[family]
    keys = list(metrics_of(family, {}))
    head = f"| {family} | " + " | ".join(keys) + f" | {score} - base (95% CI) |"
    head += " well-formed - base |" if family == "personalization" else ""
    head += " kept round by seed |"
    lines = [head, "|" + " --- |" * (len(keys) + 3 + (family == "personalization"))]
    base = arms["base"]
    for name, rows in arms.items():
        order = sorted(rows)
        cells = [mean_sd([rows[s][k] for s in order]) for k in keys]
        for key in [score] + (["well_formed_rate"] if family == "personalization" else []):
            cells.append(
                "-"
                if name == "base"
                else paired([rows[s][key] for s in order], [base[s][key] for s in order])
            )
        kept = ", ".join(str(kept_rounds[name][s]) for s in order) if name in kept_rounds else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {kept} |")
    return {name: [rows[s] for s in sorted(rows)] for name, rows in arms.items()}, "\n".join(lines)


def mean_sd(values: list) -> str:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "-"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def paired(values: list[float], base: list[float]) -> str:
    """Mean paired difference to the base over seeds, with its 95% t-interval."""
    d = np.array(values, dtype=float) - np.array(base, dtype=float)
    if len(d) < 2:
        return f"{d.mean():+.3f}"
    half = T975.get(len(d) - 1, 1.96) * d.std(ddof=1) / math.sqrt(len(d))
    return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"


def fresh_jobs(root: Path, fresh: dict[str, Path], files: dict, recipe: dict) -> dict:
    """The chosen recipe, today's 2 rounds and SFT on the fresh draw (the guard on the
    shipped valid rows)."""
    valid = files["personalization"]["valid"]
    arms = {
        "recipe": {**recipe, "guard.prompts": str(valid)},
        "today": {**TODAY, "training.rounds": 2},
        "sft": SFT["personalization"],
    }
    return {
        ("personalization", FRESH_RUN_SEED, arm): {
            "out": root / "fresh" / f"personalization-{arm}-seed{FRESH_RUN_SEED}",
            "train": fresh["train"],
            "evaluate": fresh["heldout"],
            "seed": FRESH_RUN_SEED,
            "settings": settings,
        }
        for arm, settings in arms.items()
    }


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="runs/experiment")
    parser.add_argument("--data", default=str(HERE / "data"), help="the shipped prompt files")
    parser.add_argument("--step", choices=("select", "heldout", "fresh", "all"), default="all")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, each a process")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of the recipe's runs")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another setting for every run, e.g. data.limit=6 (a trial)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: the tables from the runs already done (the others left out)",
    )
    args = parser.parse_args()
    set_rounds(args.rounds)
    global REPORT_ONLY
    REPORT_ONLY = args.report
    extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    root, data = Path(args.output), Path(args.data)
    seeds = [int(s) for s in args.seeds.split(",")]
    files = family_files(root, data)

    # 1. select on valid: personalization first (its recipe's levers carry to problems)
    done = run_all(with_extra(select_jobs(root, files, None), extra), args.workers)
    name, rounds = choose_recipe(done)
    settings = select_jobs(root, files, None)["personalization", name]["settings"]
    levers = {k: v for k, v in settings.items() if k not in ("training.rounds", "guard.keep")}
    done.update(run_all(with_extra(select_jobs(root, files, levers), extra), args.workers))
    math = {  # (best valid accuracy over the rounds, its round) by rate
        lr: max(
            (r["accuracy"], -k)
            for k, r in enumerate(rounds_of(done["problems", f"random lr {lr:g}"]["eval"]), 1)
        )
        for lr in RATES
    }
    math_lr = max(math, key=lambda lr: (math[lr], -lr))
    math_rounds = -math[math_lr][1]
    recipe = {**levers, "training.rounds": ROUNDS}
    chosen = {
        "personalization": {"settings": name, "rounds": rounds, "recipe": recipe},
        "problems": {
            "lr": math_lr,
            "rounds": math_rounds,
            "best valid accuracy (and round) by lr": {lr: [a, -k] for lr, (a, k) in math.items()},
        },
        "valid": {
            f"{family}: {n}": [
                {
                    k: r.get(k)
                    for k in (
                        "compliance",
                        "well_formed_rate",
                        "accuracy",
                        "pmi_context_mean",
                        "pmi_mean",
                        "kl_mean",
                        "objective",
                    )
                }
                for r in [result["eval"]["base"], *rounds_of(result["eval"])]
            ]
            for (family, n), result in done.items()
        },
        "label_free_tracking": label_free_tracking(done),
    }
    (root / "chosen.json").write_text(json.dumps(chosen, indent=1))
    print(
        json.dumps(
            {k: chosen[k] for k in ("personalization", "problems", "label_free_tracking")}, indent=1
        )
    )
    if args.step == "select":
        return

    # 2. held-out, once; 3. the chosen recipe on a fresh draw, run seed 3 (one pool, so both
    # workers stay busy)
    report = {"chosen_on_valid": chosen, "seeds": seeds}
    math_recipe = {  # one sample a prompt for MIPO's chosen answers here, as on valid
        **recipe,
        "pairs.samples": 1,
        "training.learning_rate": math_lr,
        "training.rounds": math_rounds,
    }
    jobs = {}
    if args.step in ("heldout", "all"):
        jobs.update(heldout_jobs(root, files, recipe, math_recipe, seeds))
    if args.step in ("fresh", "all"):
        jobs.update(fresh_jobs(root, fresh_files(root, data), files, recipe))
    done = run_all(with_extra(jobs, extra), args.workers)
    if args.step in ("heldout", "all"):
        held = {k: v for k, v in done.items() if k[1] in seeds}
        for family in SCORE:
            arms, text = arms_table(family, held, seeds)
            report[family] = arms
            print(f"\n{family}, held-out, seeds {seeds}:\n\n{text}")
    if args.step in ("fresh", "all"):
        fresh = {k: v for k, v in done.items() if k[1] == FRESH_RUN_SEED}
        arms, text = arms_table("personalization", fresh, [FRESH_RUN_SEED])
        report["fresh draw"] = arms
        print(
            f"\npersonalization, fresh draw (items seed {FRESH_SEED}), run seed "
            f"{FRESH_RUN_SEED}:\n\n{text}"
        )
    (root / f"results-{args.step}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
