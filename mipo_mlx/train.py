"""`python -m mipo_mlx.train`: the whole MIPO job from the command line.

  python -m mipo_mlx.train                  # the embedded default: a small model improves itself
  python -m mipo_mlx.train --config configs/recipe.yaml
  python -m mipo_mlx.train --config configs/gsm8k.yaml --limit 32 # a paper recipe, in minutes first
  python -m mipo_mlx.train --model <repo-or-folder> --prompts <file.jsonl> --output <dir>
                           [--iters N] [--section.key value ...]

Options are derived from the settings in `core/config.py`; an option given on the
command line beats the YAML file, which beats the defaults. This module imports
no mlx at the top, so `--help` and config errors work without a backend.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .core.cli import build_parser as _build_parser
from .core.cli import parse_args as _parse_args
from .core.cli import run_config
from .core.config import SHORTCUTS
from .core.errors import Stopped, UserError, reports_user_errors
from .core.settings import resolve
from .embedded import default_config_path

DESCRIPTION = (
    "MIPO: train LoRA adapters with DPO on pairs the model makes from your prompts "
    "(chosen = its answer; rejected = its answer to another prompt). With no arguments, "
    "runs the embedded default: a small model improving itself on synthetic tasks."
)


def parser() -> argparse.ArgumentParser:
    p = _build_parser(
        "python -m mipo_mlx.train", DESCRIPTION, SHORTCUTS, "[--resume DIR] [--limit N]"
    )
    p.add_argument(
        "--resume", metavar="DIR", help="continue an interrupted run in DIR with its settings"
    )
    p.add_argument(
        "--limit",
        metavar="N",
        type=_count,
        help="a quick trial: the first N training prompts and the first N held-out prompts "
        "(sets data.limit and evaluation.limit)",
    )
    p.add_argument(
        "--subset",
        metavar="N",
        type=_count,
        help="N training prompts drawn at random (seeded; sets data.subset)",
    )
    return p


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def quick_trial(overrides: dict, extras: dict) -> None:
    """--limit / --subset as the settings they stand for; an explicit --section.key wins."""
    if "limit" in extras:
        overrides.setdefault("data.limit", extras["limit"])
        overrides.setdefault("evaluation.limit", extras["limit"])
    if "subset" in extras:
        overrides.setdefault("data.subset", extras["subset"])


def read_command_line(argv: list[str] | None, extras: dict | None = None):
    yaml_path, overrides, rest = _parse_args(parser(), argv)
    if extras is not None:
        extras.update(rest)
    return yaml_path, overrides


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    extras: dict = {}
    yaml_path, overrides = read_command_line(argv, extras)
    resume_dir = extras.get("resume")
    quick_trial(overrides, extras)
    run_settings = None  # a resumed run's own settings (never those that run model code)
    if resume_dir:
        if not (Path(resume_dir) / "config.yaml").is_file():
            raise UserError(
                f"{resume_dir}: no config.yaml, so no run to resume; start it without --resume"
            )
        if yaml_path is None:
            run_settings = run_config(resume_dir, "--model.trust_remote_code true")
        overrides["output.dir"] = resume_dir
    elif yaml_path is None and not ({"model.path", "data.prompts"} & set(overrides)):
        yaml_path = str(default_config_path())
        if "output.dir" not in overrides:  # a fresh folder each time, so a rerun never collides
            overrides["output.dir"] = time.strftime("runs/embedded-%Y%m%d-%H%M%S")
    config = resolve(yaml_path, overrides, run_settings)
    from .core.backend import require_mlx

    require_mlx()
    from .engine import distributed as dist

    # Rank 0's folder for every rank (the default one is timestamped)
    output_dir = config.output.dir
    config.output.dir = dist.decided(lambda: output_dir)
    from .engine.trainer import NonFiniteLoss
    from .pipeline import run

    out = config.output.dir
    try:
        result = run(config, resume_run=bool(resume_dir))
    except RuntimeError as err:
        if not dist.lost_peer(err):
            raise
        raise UserError(
            f"{dist.describe()}: another rank stopped ({err}); "
            f"the last checkpoint in {out} is kept. "
            f"Resume with: mlx.launch ... python -m mipo_mlx.train --resume {out}"
        ) from None
    except Stopped as stop:
        print(
            f"stopped {stop.where}; finished work is saved. "
            f"Resume with: python -m mipo_mlx.train --resume {out}",
            file=sys.stderr,
        )
        return 130
    except NonFiniteLoss as err:
        raise UserError(
            f"{err}; training stopped and the last good checkpoint in {out}/checkpoint is kept. "
            "Lower training.learning_rate, or set training.on_nan=skip"
        ) from None
    if not dist.is_main():
        return 0
    m = result.metrics
    print(
        f"done: {len(result.pairs)} pairs, final loss {m.get('loss', float('nan')):.4f}, "
        f"reward margin {m.get('rewards/margins', float('nan')):.4f}, "
        f"reward accuracy {m.get('rewards/accuracies', float('nan')):.2f}; "
        f"output in {result.output}"
    )
    if result.evaluation is not None:
        print(result.evaluation)
    if result.guard is not None:
        print(result.guard)
    print(next_steps(config, result))
    return 0


def next_steps(config, result) -> str:
    """Where the outputs are, and the next three commands, each runnable as printed: chat
    with the adapters, evaluate them, export the fused model."""
    out = Path(result.output)
    model = config.model.path
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())  # a local base model, from anywhere
    files = ["adapters.safetensors", "eval.md", "eval.png", "training.png", "pairs.jsonl"]
    chat = ["python", "-m", "mlx_lm", "generate", "--model", model, "--adapter-path", str(out)]
    chat += ["--max-tokens", str(config.generation.max_tokens)]
    chat += ["--prompt", result.example or "Hello!"]
    lines = [
        f"outputs in {out}: " + ", ".join(name for name in files if (out / name).is_file()),
        "next:",
        "  chat with the adapters:  " + shlex.join(chat),
        "  evaluate them:           "
        + shlex.join(["python", "-m", "mipo_mlx.evaluate", "--adapters", str(out)]),
        "  export the fused model:  "
        + shlex.join(
            ["python", "-m", "mipo_mlx.export", "--adapters", str(out), "--output", f"{out}-fused"]
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
