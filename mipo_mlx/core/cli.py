"""Command-line options derived from the settings in `config.py`, shared by the CLIs.

Every setting is `--section.key VALUE`; a few short forms name the settings a
command needs most. Options not given are absent (never defaults), so they
cannot override a YAML file. This module imports no mlx.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Any

from .config import Config, all_keys, sections, settings_of
from .errors import UserError
from .reading import parse_yaml
from .settings import apply, load_yaml


def _describe(default: Any) -> str:
    return (
        "null" if default is None else repr(default) if isinstance(default, str) else str(default)
    )


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one-line user errors, with a did-you-mean hint."""

    def error(self, message: str):
        match = re.search(r"unrecognized arguments: (\S+)", message)
        if match and match.group(1).startswith("--"):
            known = [*all_keys(), *getattr(self, "shortcuts", {}), "config"]
            close = difflib.get_close_matches(match.group(1)[2:], known, n=1, cutoff=0.5)
            hint = f" (did you mean '--{close[0]}'?)" if close else "; see --help for the options"
            raise UserError(f"command line: unknown option '{match.group(1)}'{hint}")
        raise UserError(f"command line: {message}; see --help")


# How the short forms read in --help.
METAVARS = {"model": "M", "prompts": "P", "output": "DIR", "iters": "N", "limit": "N"}


def build_parser(
    prog: str, description: str, shortcuts: dict[str, str], usage: str = ""
) -> argparse.ArgumentParser:
    """The command's parser: --config, the short forms, then every setting grouped by section.

    The usage line names the short forms (and `usage`, the command's own options) and ends
    with `[--section.key VALUE ...]`: listing all ~70 settings there would bury it."""
    parts = ["%(prog)s [--config YAML]"]
    parts += [f"[--{name} {METAVARS.get(name, 'VALUE')}]" for name in shortcuts]
    parts += [usage] * bool(usage) + ["[--section.key VALUE ...]"]
    parser = _Parser(
        allow_abbrev=False,  # '--training.learning_rat' is a mistake, not a shorthand
        prog=prog,
        usage=" ".join(parts),
        description=description,
        argument_default=argparse.SUPPRESS,  # an option not given never overrides the YAML file
    )
    parser.shortcuts = shortcuts
    parser.add_argument(
        "--config", metavar="YAML", help="YAML file of settings (sections as below)."
    )
    for name, key in shortcuts.items():
        parser.add_argument(
            f"--{name}", dest=key, metavar=METAVARS.get(name, "VALUE"), help=f"Same as --{key}."
        )
    defaults = Config()
    for section_name, section in sections().items():
        group = parser.add_argument_group(f"{section_name} settings")
        for name, (_, f) in settings_of(section).items():
            key = f"{section_name}.{name}"
            default = getattr(getattr(defaults, section_name), name)
            group.add_argument(
                f"--{key}",
                dest=key,
                metavar="VALUE",
                help=f"{f.metadata['help']} (default: {_describe(default)})",
            )
    return parser


def parse_value(key: str, text: str) -> Any:
    """CLI text to a value: strings stay strings; others are read as YAML scalars/lists."""
    section_name, name = key.split(".", 1)
    hint = settings_of(sections()[section_name])[name][0]
    if hint is str or hint == (str | None):
        return None if text == "null" and hint is not str else text
    try:
        return parse_yaml(text, f"command line: --{key}")
    except UserError:
        shown = repr(text) if len(text) <= 60 else repr(text[:57]) + "..."
        raise UserError(f"command line: --{key} {shown} is not a valid value") from None


_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def join_negative_numbers(argv: list[str]) -> list[str]:
    """'--key -1e-5' -> '--key=-1e-5': argparse would read '-1e-5' as an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NUMBER.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[str | None, dict[str, Any], dict]:
    """(YAML path, {dotted key: value}, other options) from the command line."""
    import sys

    argv = join_negative_numbers(list(sys.argv[1:] if argv is None else argv))
    args = vars(parser.parse_args(argv))
    yaml_path = args.pop("config", None)
    keys = set(all_keys())
    overrides = {key: parse_value(key, text) for key, text in args.items() if key in keys}
    extras = {key: value for key, value in args.items() if key not in keys}
    return yaml_path, overrides, extras


# Settings that let a model's own files run code on this machine: honoured only from this
# command line (an option, or a --config file named there), never from a run folder someone
# may have shared, whose config.yaml could ask for them.
RUNS_CODE = ("model.trust_remote_code",)


def run_config(run: str | Path, allow: str) -> Config:
    """The settings of a run folder's config.yaml, less RUNS_CODE: where the file sets one,
    one note says it was not honoured and how to allow it (`allow`, this command's option)."""
    path = Path(run) / "config.yaml"
    settings = load_yaml(path)
    for key in RUNS_CODE:
        if settings.pop(key, False) is True:
            print(
                f"note: {path} sets {key}: true; not honoured from a run folder (the model's "
                f"files could run code here); pass {allow} to allow it",
                file=sys.stderr,
            )
    return apply(Config(), settings, str(path))
