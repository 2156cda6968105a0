"""`python -m mipo_mlx.train`: the whole MIPO job from the command line.

  python -m mipo_mlx.train --config configs/recipe.yaml
  python -m mipo_mlx.train --model <repo-or-folder> --prompts <file.jsonl> --output <dir> [--iters N]
                           [--section.key value ...]

Options are derived from the settings in `config.py`; an option given on the
command line beats the YAML file, which beats the defaults. This module imports
no mlx at the top, so `--help` and config errors work without a backend.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Any

import yaml

from .config import SHORTCUTS, Config, all_keys, resolve, sections, settings_of
from .errors import UserError, reports_user_errors


def _describe(default: Any) -> str:
    return "null" if default is None else repr(default) if isinstance(default, str) else str(default)


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one-line user errors, with a did-you-mean hint."""

    def error(self, message: str):
        match = re.search(r"unrecognized arguments: (\S+)", message)
        if match and match.group(1).startswith("--"):
            known = [*all_keys(), *SHORTCUTS, "config"]
            close = difflib.get_close_matches(match.group(1)[2:], known, n=1, cutoff=0.5)
            hint = f" (did you mean '--{close[0]}'?)" if close else "; see --help for the options"
            raise UserError(f"command line: unknown option '{match.group(1)}'{hint}")
        raise UserError(f"command line: {message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        allow_abbrev=False,  # '--training.learning_rat' is a mistake, not a shorthand
        prog="python -m mipo_mlx.train",
        description="MIPO: train LoRA adapters with DPO on pairs the model makes from your prompts "
                    "(chosen = its answer; rejected = its answer to another prompt).",
        argument_default=argparse.SUPPRESS,  # an option not given never overrides the YAML file
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings (sections as below).")
    for short, key in SHORTCUTS.items():
        parser.add_argument(f"--{short}", dest=key, metavar="VALUE", help=f"Same as --{key}.")
    defaults = Config()
    for section_name, section in sections().items():
        group = parser.add_argument_group(f"{section_name} settings")
        for name, (_, f) in settings_of(section).items():
            key = f"{section_name}.{name}"
            default = getattr(getattr(defaults, section_name), name)
            group.add_argument(f"--{key}", dest=key, metavar="VALUE",
                               help=f"{f.metadata['help']} (default: {_describe(default)})")
    return parser


def parse_value(key: str, text: str) -> Any:
    """CLI text to a value: strings stay strings; others are read as YAML scalars/lists."""
    section_name, name = key.split(".", 1)
    hint = settings_of(sections()[section_name])[name][0]
    if hint is str or hint == (str | None):
        return None if text == "null" and hint is not str else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"command line: --{key} {text!r} is not a valid value") from None


def parse_args(argv: list[str] | None) -> tuple[str | None, dict[str, Any]]:
    args = vars(build_parser().parse_args(argv))
    yaml_path = args.pop("config", None)
    return yaml_path, {key: parse_value(key, text) for key, text in args.items()}


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    yaml_path, overrides = parse_args(argv)
    config = resolve(yaml_path, overrides)
    from ._backend import require_mlx

    require_mlx()
    from .pipeline import run

    result = run(config)
    m = result.metrics
    print(f"done: {len(result.pairs)} pairs, final loss {m.get('loss', float('nan')):.4f}, "
          f"reward margin {m.get('rewards/margins', float('nan')):.4f}, "
          f"accuracy {m.get('rewards/accuracies', float('nan')):.2f}; output in {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
