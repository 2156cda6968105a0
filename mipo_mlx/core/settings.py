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
    OPTIMIZERS,
    Config,
    DataConfig,
    TrainingConfig,
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
    if origin is dict:
        if not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
            raise UserError(
                f"{where}: '{key}' must be a mapping of names to values, e.g. {{momentum: 0.9}} "
                f"(JSON on the command line), got {_shown(value)}"
            )
        return {
            _text(k, repr(f"{key}.{k}")[1:-1], where): v
            if args[1] is Any
            else coerce(v, args[1], f"{key}.{k}", where)
            for k, v in value.items()
        }
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
    if value is None or isinstance(value, (bool, str, list, dict)):
        return
    check_range(value, meta.get("min"), meta.get("max"), key, where)
    if "gt" in meta and value <= meta["gt"]:
        raise UserError(f"{where}: '{key}' must be greater than {meta['gt']}, got {value}")


def check_range(value: float, least: float | None, most: float | None, key: str, where: str):
    """A number finite and within [least, most] (None: no limit; a whole number is at most
    INT_MAX)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: '{key}' must be a finite number, got {value}")
    most = INT_MAX if most is None and isinstance(value, int) else most
    if least is not None and value < least:
        raise UserError(f"{where}: '{key}' must be at least {least}, got {_shown(value)}")
    if most is not None and value > most:
        raise UserError(f"{where}: '{key}' must be at most {most}, got {_shown(value)}")


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


# The training.<key>s that give an optimizer keyword: adam_beta1 and adam_beta2 are the betas of
# adam and adamw, weight_decay the weight decay of every optimizer that has one.
FROM_TRAINING = {"betas": ("adam_beta1", "adam_beta2"), "weight_decay": ("weight_decay",)}
# Where mipo_mlx's default is not the class's: adafactor's relative steps would ignore the
# schedule, and its parameter scaling would shrink the step of LoRA's B (zeros at first) to
# 1e-3 of the schedule's.
OWN_DEFAULTS = {"adafactor": {"relative_step": False, "scale_parameter": False}}


def _option_value(value: Any, kind: tuple, key: str, where: str) -> Any:
    """One training.optimizer_config value held to its kind and limits (config.OPTIMIZERS)."""
    form, least, most = kind
    if form == "2 floats":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise UserError(f"{where}: '{key}' must be a list of two numbers, got {_shown(value)}")
        return [_option_value(v, ("float", least, most), key, where) for v in value]
    if form == "float or null" and value is None:
        return None
    value = coerce(value, {"bool": bool, "int": int}.get(form, float), key, where)
    if form != "bool":
        check_range(value, least, most, key, where)
    return value


def checked_optimizer_config(training: TrainingConfig, where: str = "settings") -> dict[str, Any]:
    """training.optimizer_config held to what training.optimizer takes (config.OPTIMIZERS):
    each key a keyword of its class but learning_rate, each value of its kind and within its
    limits. Returned with its values plain: a number written '1e-8' read as one, a tuple a list."""
    name, takes = training.optimizer, OPTIMIZERS[training.optimizer]
    checked = {}
    for key, value in training.optimizer_config.items():
        dotted = f"training.optimizer_config.{key}"
        if key == "learning_rate":
            raise UserError(
                f"{where}: '{dotted}' is not taken: the schedule sets the learning rate; set "
                "training.learning_rate (its peak), training.warmup_fraction and "
                "training.min_lr_ratio"
            )
        if key not in takes:
            elsewhere = [other for other, keys in OPTIMIZERS.items() if key in keys]
            close = difflib.get_close_matches(str(key), list(takes), n=1, cutoff=0.5)
            hint = (
                " (it holds the keywords of training.optimizer itself, not one mapping per "
                "optimizer as mlx-lm's config file)"
                if key in OPTIMIZERS
                else f" (taken by {' and '.join(elsewhere)}, not {name})"
                if elsewhere
                else f" (did you mean '{close[0]}'?)"
                if close
                else ""
            )
            raise UserError(
                f"{where}: unknown key {_shown(dotted)} for training.optimizer={name}{hint}; "
                f"{name} takes {', '.join(takes)}"
            )
        checked[key] = _option_value(value, takes[key], dotted, where)
    return checked


def optimizer_kwargs(training: TrainingConfig, where: str = "settings") -> dict[str, Any]:
    """The keyword arguments training.optimizer is built with, but its learning rate (the
    schedule): training.optimizer_config's; for a keyword it does not give, what the training
    keys give (FROM_TRAINING) or mipo_mlx's own default (OWN_DEFAULTS); the class's default
    for the rest. A training key off its default that optimizer_config also gives, or that the
    optimizer has no use for, is refused."""
    name = training.optimizer
    kwargs = checked_optimizer_config(training, where)
    defaults = type(training)()
    for keyword, keys in FROM_TRAINING.items():
        changed = [k for k in keys if getattr(training, k) != getattr(defaults, k)]
        if keyword not in OPTIMIZERS[name]:
            if changed:
                users = ", ".join(n for n, takes in OPTIMIZERS.items() if keyword in takes)
                raise UserError(
                    f"{where}: training.{changed[0]}={getattr(training, changed[0])} has no "
                    f"effect on training.optimizer={name} (only {users} use it); leave it at "
                    f"{getattr(defaults, changed[0])} or choose one of those optimizers"
                )
        elif keyword in kwargs:
            if changed:
                raise UserError(
                    f"{where}: training.optimizer_config.{keyword} replaces "
                    f"training.{changed[0]}; set one of the two"
                )
        else:
            values = [getattr(training, k) for k in keys]
            kwargs[keyword] = values if len(values) > 1 else values[0]
    for keyword, value in OWN_DEFAULTS.get(name, {}).items():
        kwargs.setdefault(keyword, value)
    if name == "sgd" and kwargs.get("nesterov"):
        if kwargs.get("momentum", 0) <= 0 or kwargs.get("dampening", 0) != 0:
            raise UserError(
                f"{where}: training.optimizer_config.nesterov needs a momentum above 0 and no "
                "dampening (sgd); set training.optimizer_config.momentum (e.g. 0.9), or "
                "nesterov: false"
            )
    return kwargs


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
    config.training.optimizer_config = checked_optimizer_config(config.training)
    optimizer_kwargs(config.training)
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
