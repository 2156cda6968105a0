"""`python -m mipo_mlx.train`: the whole MIPO job from the command line.

  python -m mipo_mlx.train                               # the embedded default: a small model improves itself
  python -m mipo_mlx.train --config configs/recipe.yaml
  python -m mipo_mlx.train --model <repo-or-folder> --prompts <file.jsonl> --output <dir> [--iters N]
                           [--section.key value ...]

Options are derived from the settings in `config.py`; an option given on the
command line beats the YAML file, which beats the defaults. This module imports
no mlx at the top, so `--help` and config errors work without a backend.
"""

from __future__ import annotations

import argparse
import sys
import time

from .cli import build_parser as _build_parser
from .cli import parse_args as _parse_args
from .config import SHORTCUTS, resolve
from .errors import reports_user_errors

DESCRIPTION = ("MIPO: train LoRA adapters with DPO on pairs the model makes from your prompts "
               "(chosen = its answer; rejected = its answer to another prompt). With no arguments, "
               "runs the embedded default: a small model improving itself on synthetic tasks.")


def build_parser() -> argparse.ArgumentParser:
    return _build_parser("python -m mipo_mlx.train", DESCRIPTION, SHORTCUTS)


def parse_args(argv: list[str] | None):
    yaml_path, overrides, _ = _parse_args(build_parser(), argv)
    return yaml_path, overrides


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    yaml_path, overrides = parse_args(argv)
    if yaml_path is None and not ({"model.path", "data.prompts"} & set(overrides)):
        from .embedded import default_config_path

        yaml_path = str(default_config_path())
        if "output.dir" not in overrides:  # a fresh folder each time, so a rerun never collides
            overrides["output.dir"] = time.strftime("runs/embedded-%Y%m%d-%H%M%S")
    config = resolve(yaml_path, overrides)
    from ._backend import require_mlx

    require_mlx()
    from .pipeline import run

    result = run(config)
    m = result.metrics
    print(f"done: {len(result.pairs)} pairs, final loss {m.get('loss', float('nan')):.4f}, "
          f"reward margin {m.get('rewards/margins', float('nan')):.4f}, "
          f"reward accuracy {m.get('rewards/accuracies', float('nan')):.2f}; output in {result.output}")
    if result.evaluation is not None:
        print(result.evaluation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
