"""Checking and reading settings: a value from a YAML file, the command line or Python code
is held to the type and limits of its field in `config.py`, and the rules across keys are
checked in one place (`validate`). Precedence: command line > YAML file > defaults; an
option not given on the command line never overrides the YAML file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import string
import typing
from pathlib import Path
from typing import Any

from ..embedded import resolve_path
from . import reading
from .config import (
    INT_MAX,
    NEGATIVE_STRATEGIES,
    Config,
    DataConfig,
    all_keys,
    sections,
    settings_of,
)
from .errors import UserError
from .loss_settings import check_loss_settings


def _unknown(key: str, known: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
    return UserError(f"{where}: unknown key '{key}'{hint}")


def coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `hint`; accept '1e-5' for a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, where)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: '{key}' must be a list, got {_shown(value)}")
        return [coerce(v, args[0], key, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: '{key}' must be true or false, got {_shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: '{key}' must be an integer, got {_shown(value)}")
    if hint is float:
        # PyYAML reads 1e-5 (no dot) as a string; an int past a float's range is no number
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except (ValueError, OverflowError):
                pass
        raise UserError(f"{where}: '{key}' must be a number, got {_shown(value)}")
    if hint is str:
        if isinstance(value, str):
            return _text(value, key, where)
        raise UserError(f"{where}: '{key}' must be a string, got {_shown(value)}")
    raise TypeError(f"unsupported setting type {hint!r} for {key}")


def _shown(value: Any) -> str:
    """A value as a message shows it: a huge number or text cut short."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge number"
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: str, key: str, where: str) -> str:
    """A string setting that a path, a tokenizer or a message can take whole."""
    if "\x00" in value:
        raise UserError(f"{where}: '{key}' holds a NUL character; remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(
            f"{where}: '{key}' holds a lone surrogate, which is no character; write the "
            "character itself"
        ) from None
    return value


def check_limits(value: Any, f: dataclasses.Field, key: str, where: str) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        shown = ", ".join("null" if c is None else str(c) for c in meta["choices"])
        raise UserError(f"{where}: '{key}' must be one of {shown}, got {_shown(value)}")
    for refused, why in meta.get("refused", ()):
        if value == refused and type(value) is type(refused):
            raise UserError(f"{where}: '{key}' = {json.dumps(value)} {why}")
    if "template" in meta:
        check_template(key, value, set(meta["template"]), where)
    if value is None or isinstance(value, (bool, str, list)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: '{key}' must be a finite number, got {value}")
    top = meta.get("max", INT_MAX if isinstance(value, int) else None)
    if "min" in meta and value < meta["min"]:
        raise UserError(f"{where}: '{key}' must be at least {meta['min']}, got {_shown(value)}")
    if top is not None and value > top:
        raise UserError(f"{where}: '{key}' must be at most {top}, got {_shown(value)}")
    if "gt" in meta and value <= meta["gt"]:
        raise UserError(f"{where}: '{key}' must be greater than {meta['gt']}, got {value}")


def apply(config: Config, overrides: dict[str, Any], where: str) -> Config:
    """Set dotted keys ('training.beta') on `config`, checking types and limits."""
    for dotted, value in overrides.items():
        section_name, _, name = dotted.partition(".")
        if section_name not in sections() or not name:
            raise _unknown(dotted, all_keys(), where)
        fields = settings_of(sections()[section_name])
        if name not in fields:
            raise _unknown(dotted, all_keys(), where)
        hint, f = fields[name]
        value = coerce(value, hint, dotted, where)
        check_limits(value, f, dotted, where)
        setattr(getattr(config, section_name), name, value)
    return config


def flatten_yaml(data: Any, where: str) -> dict[str, Any]:
    """Turn {section: {key: value}} into {'section.key': value}."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of sections (model:, training:, ...)")
    flat = {}
    for section_name, body in data.items():
        if section_name not in sections():
            raise _unknown(str(section_name), list(sections()), where)
        if not isinstance(body, dict):
            raise UserError(f"{where}: section '{section_name}' must be a mapping of keys")
        for key, value in body.items():
            flat[f"{section_name}.{key}"] = value
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A settings file as {'section.key': value}, read strictly (`reading.parse_yaml`)."""
    text = reading.read_text(path, "config")
    return flatten_yaml(reading.parse_yaml(text, str(path)), str(path))


def check_template(key: str, template: str, names: set[str], where: str = "settings") -> None:
    """The template must use exactly `names` as its {fields}, each plain: no format spec,
    conversion, index or attribute, and no positional field (literal braces are {{ }})."""
    need = ", ".join("{" + n + "}" for n in sorted(names))
    try:
        parsed = [p for p in string.Formatter().parse(template) if p[1] is not None]
    except ValueError as err:
        raise UserError(
            f"{where}: '{key}': {err} in {_shown(template)}; write literal braces as {{{{ and }}}}"
        ) from None
    for _, name, spec, conversion in parsed:
        if name not in names or spec or conversion:
            shown = (
                "{"
                + name
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            raise UserError(
                f"{where}: '{key}' has the field {_shown(shown)}; use only {need}, "
                "plain (no format spec, conversion, index or attribute)"
            )
    if {name for _, name, _, _ in parsed} != names:
        raise UserError(
            f"{where}: '{key}' must use exactly {need} as fields, got {_shown(template)}"
        )


def check_settings(config: Config, where: str = "settings") -> None:
    """Every field's type and limits, as the YAML file and the command line are checked: a
    Config built or changed in Python is held to the same rules."""
    for section_name, section_type in sections().items():
        section = getattr(config, section_name, None)
        if type(section) is not section_type:
            raise UserError(f"{where}: '{section_name}' must be a {section_type.__name__}")
        for name, (hint, f) in settings_of(section_type).items():
            key = f"{section_name}.{name}"
            value = coerce(getattr(section, name), hint, key, where)
            check_limits(value, f, key, where)
            setattr(section, name, value)


def validate(config: Config, command: str = "train") -> Config:
    """Rules across keys that one field's limits cannot state, and the keys `command`
    ('train' or 'evaluate') needs: every check that spans sections is here."""
    check_settings(config)
    data = config.data
    if data.template is not None:
        defaults = DataConfig()
        changed = [
            k
            for k in ("prompt_template", "context_template")
            if getattr(data, k) != getattr(defaults, k)
        ]
        if changed:
            raise UserError(
                f"data.template={data.template} replaces data.{changed[0]}; set one of the two"
            )
        if data.template != "prism" and NEGATIVE_STRATEGIES[config.pairs.negatives].context:
            raise UserError(
                f"pairs.negatives={config.pairs.negatives} needs a template "
                "with the user's context; "
                f"data.template={data.template} has none (use prism or your own context_template)"
            )
    needs = NEGATIVE_STRATEGIES[config.pairs.negatives].samples
    if config.pairs.samples < needs:
        raise UserError(
            f"pairs.negatives={config.pairs.negatives} needs at least {needs} answers per prompt "
            f"(pairs.samples); set pairs.samples to at least {needs} (got {config.pairs.samples})"
        )
    check_loss_settings(config.training)
    if config.lora.type == "full" and config.lora.keys:
        raise UserError(
            "lora.keys chooses the linears adapters go on; lora.type=full trains every weight of "
            "the last lora.num_layers blocks; leave lora.keys null, or choose lora or dora"
        )
    if config.training.fresh_prompts and config.training.rounds > 1 and not data.limit:
        raise UserError(
            "training.fresh_prompts needs data.limit: each round takes the next data.limit "
            "prompts of data.prompts"
        )
    if not config.model.path:
        hint = "--adapters <run-dir>" if command == "evaluate" else "set it in the config"
        raise UserError(f"model.path is not set: pass --model <repo-or-folder> or {hint}")
    if command == "train" and not config.data.prompts:
        raise UserError(
            "data.prompts is not set: pass --prompts <file.jsonl> or set it in the config"
        )
    if command == "evaluate" and not config.evaluation.prompts:
        raise UserError("evaluation.prompts is not set: pass --prompts <heldout.jsonl>")
    return config


def resolve(
    yaml_path: str | None, cli_overrides: dict[str, Any], defaults: Config | None = None
) -> Config:
    """Defaults, then the YAML file, then the command line."""
    config = defaults if defaults is not None else Config()
    if yaml_path:
        apply(config, load_yaml(yaml_path), str(yaml_path))
    apply(config, cli_overrides, "command line")
    config.model.path = resolve_path(config.model.path)
    config.data.prompts = resolve_path(config.data.prompts)
    config.evaluation.prompts = resolve_path(config.evaluation.prompts)
    config.evaluation.judge = resolve_path(config.evaluation.judge)
    config.guard.prompts = resolve_path(config.guard.prompts)
    return config


def from_dict(data: dict[str, Any], where: str) -> Config:
    return apply(Config(), flatten_yaml(data, where), where)
