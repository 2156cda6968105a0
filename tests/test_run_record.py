"""A resume is held to the run's record (run.json), not to config.yaml: every setting that
changes what is computed, and the model at model.path, must be what the run started with;
the settings in MAY_CHANGE may differ. A checkpoint loads only into adapters and an
optimizer of its own keys and shapes."""

from __future__ import annotations

import copy
import math
import shutil

import mlx.core as mx
import mlx.optimizers as optim
import pytest

from mipo_mlx.core.config import (
    Config,
    LoraConfig,
    ModelConfig,
    all_keys,
    settings_of,
    to_yaml,
)
from mipo_mlx.core.errors import UserError
from mipo_mlx.core.settings import resolve
from mipo_mlx.engine import train_state as ckpt
from mipo_mlx.engine.lora import adapter_weights, attach_lora
from mipo_mlx.stages.run_folder import RunFolder, check_same_run, portable
from mipo_mlx.stages.run_record import MAY_CHANGE, RECORD, may_change


def started(tmp_path, model_dir, **sections) -> tuple[RunFolder, Config]:
    """A run folder as a run leaves it when it starts: config.yaml and its record."""
    config = Config()
    config.model.path = str(model_dir)
    config.data.prompts = str(tmp_path / "p.jsonl")
    config.output.dir = str(tmp_path / "run")
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(config, section), key, value)
    folder = RunFolder(config.output.dir)
    folder.start(config)
    folder.keep_record(config, None)
    return folder, config


def other_value(dotted: str, value):
    """A valid value of the setting `dotted` other than `value`."""
    section, key = dotted.split(".")
    hint, f = settings_of(type(getattr(Config(), section)))[key]
    meta = f.metadata
    if "choices" in meta:
        return next(c for c in meta["choices"] if c != value)
    if isinstance(value, bool):
        return not value
    if "list" in str(hint):
        return ["self_attn.q_proj"]
    if isinstance(value, dict):
        return {"eps": 1e-6}
    if isinstance(value, str) or "str" in str(hint):
        return f"{value or 'x'}-edited"
    lo, hi = meta.get("min", meta.get("gt", 0)), meta.get("max", math.inf)
    for candidate in ((value or 0) + 1, (value or 0) / 2, lo + 0.25, lo + 2):
        typed = int(candidate) if "int" in str(hint) else float(candidate)
        refused = [r for r, _ in meta.get("refused", ())]
        if (
            typed != value
            and lo <= typed <= hi
            and typed > meta.get("gt", -math.inf)
            and typed not in refused
        ):
            return typed
    raise AssertionError(f"no other value for {dotted}")


def edited(config: Config, dotted: str) -> Config:
    config = copy.deepcopy(config)
    section, key = dotted.split(".")
    now = getattr(getattr(config, section), key)
    setattr(getattr(config, section), key, other_value(dotted, now))
    return config


def as_resumed(folder: RunFolder, config: Config) -> Config:
    """config.yaml edited to say `config`, read back as `--resume` reads it."""
    (folder.path / "config.yaml").write_text(to_yaml(portable(config)))
    return resolve(str(folder.path / "config.yaml"), {"output.dir": str(folder.path)})


FIXED = [k for k in all_keys() if not may_change(k, {})]
FREE = [k for k in all_keys() if may_change(k, {})]


@pytest.mark.parametrize("key", FIXED)
def test_a_setting_that_may_not_change_is_refused_in_one_line(tmp_path, toy_model_dir, key):
    """config.yaml as read now says another value: the resume names the key, in one line."""
    folder, config = started(tmp_path, toy_model_dir)
    with pytest.raises(UserError, match=f"belongs to another run \\({key} was ") as err:
        check_same_run(folder.path, as_resumed(folder, edited(config, key)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", FREE)
def test_a_setting_that_may_change_is_accepted(tmp_path, toy_model_dir, key):
    folder, config = started(tmp_path, toy_model_dir)
    check_same_run(folder.path, as_resumed(folder, edited(config, key)))


def test_the_free_settings_are_the_listed_ones():
    assert set(FREE) == {
        *(k for k in MAY_CHANGE if not k.endswith("*")),
        *(k for k in all_keys() if k.startswith("evaluation.")),
    }


def test_with_a_guard_the_evaluation_settings_rank_the_rounds_and_are_fixed(
    tmp_path, toy_model_dir
):
    folder, config = started(tmp_path, toy_model_dir, guard__prompts=str(tmp_path / "v.jsonl"))
    with pytest.raises(UserError, match="evaluation.max_tokens was 256"):
        check_same_run(folder.path, edited(config, "evaluation.max_tokens"))
    check_same_run(folder.path, edited(config, "evaluation.plots"))


def other_weights(source, target, scale=1.5):
    """A copy of the model folder at `target` whose weights differ (same names and shapes)."""
    shutil.copytree(source, target)
    weights = mx.load(str(target / "model.safetensors"))
    mx.save_safetensors(
        str(target / "model.safetensors"),
        {k: v * scale for k, v in weights.items()},
        metadata={"format": "mlx"},
    )
    return target


def test_another_model_of_the_same_shape_is_refused(tmp_path, toy_model_dir):
    folder, config = started(tmp_path, toy_model_dir)
    swapped = copy.deepcopy(config)
    swapped.model.path = str(other_weights(toy_model_dir, tmp_path / "other"))
    with pytest.raises(UserError, match="the model at model.path changed .*model.safetensors"):
        check_same_run(folder.path, swapped)


def test_the_model_edited_in_place_is_refused_and_the_same_model_moved_is_not(
    tmp_path, toy_model_dir
):
    model = tmp_path / "model"
    shutil.copytree(toy_model_dir, model)
    folder, config = started(tmp_path, model)
    moved = copy.deepcopy(config)
    moved.model.path = str(shutil.copytree(model, tmp_path / "moved"))
    check_same_run(folder.path, moved)  # the same files, elsewhere
    (model / "config.json").write_text((model / "config.json").read_text().replace("}", " }"))
    with pytest.raises(UserError, match=r"model.path changed since the run started \(config"):
        check_same_run(folder.path, config)


def test_a_damaged_record_is_one_line(tmp_path, toy_model_dir):
    folder, config = started(tmp_path, toy_model_dir)
    (folder.path / RECORD).write_text('{"settings": ')
    with pytest.raises(UserError, match="run.json: damaged"):
        check_same_run(folder.path, config)


def test_changed_evaluation_drops_the_cached_evaluation_once(tmp_path, toy_model_dir):
    folder, config = started(tmp_path, toy_model_dir)
    folder.written.add("eval_base.json", "eval_round-2.json")  # as the run records its writes
    for name in ("eval_base.json", "eval_round-2.json", "eval_round-7.json"):  # 7: the user's
        (folder.path / name).write_text("{}")
    assert not folder.refresh_evaluation(config, None)  # unchanged: kept
    assert (folder.path / "eval_base.json").is_file()
    config.evaluation.limit = 10
    assert folder.refresh_evaluation(config, None)
    assert [p.name for p in folder.path.glob("eval_*.json")] == ["eval_round-7.json"]
    assert not folder.refresh_evaluation(config, None)  # recorded: the next resume keeps them


@pytest.fixture
def lora_model(toy_model):
    model = copy.deepcopy(toy_model[0])
    attach_lora(model, LoraConfig(rank=4), seed=0)
    return model


def state_of(model) -> ckpt.TrainState:
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    return ckpt.capture(model, optimizer, 3, 3)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda s: s.adapters.popitem(), "its adapters do not fit this run"),
        (lambda s: s.adapters.update(extra=mx.zeros((2,))), "(extra: saved (2,), needed nothing)"),
        (lambda s: s.optimizer.popitem(), "its optimizer state do not fit"),
        (
            lambda s: s.adapters.update({k: v[:2] for k, v in list(s.adapters.items())[:1]}),
            "needed (",
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(lora_model, damage, fragment):
    """A key missing, one more, or a shape cut: refused, and nothing is loaded."""
    state = state_of(lora_model)
    damage(state)
    before = adapter_weights(lora_model)
    with pytest.raises(UserError, match="the checkpoint: its ") as err:
        ckpt.restore(lora_model, optim.AdamW(learning_rate=1e-3), state)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert all(mx.array_equal(before[k], v) for k, v in adapter_weights(lora_model).items())


def test_a_checkpoint_of_another_rank_is_refused(toy_model, lora_model):
    """Rank 8 adapters into a rank 4 model: once loaded with strict=False, now refused."""
    other = copy.deepcopy(toy_model[0])
    attach_lora(other, LoraConfig(rank=8), seed=0)
    with pytest.raises(UserError, match=r"lora_a: saved \(128, 8\), needed \(128, 4\)"):
        ckpt.restore(lora_model, optim.AdamW(learning_rate=1e-3), state_of(other))


def test_a_fitting_checkpoint_restores(lora_model):
    state = state_of(lora_model)
    ckpt.restore(lora_model, optim.AdamW(learning_rate=1e-3), state)


def test_model_config_path_is_compared_by_identity_only_when_known(tmp_path, toy_model_dir):
    folder, config = started(tmp_path, toy_model_dir)
    hub = copy.deepcopy(config)
    hub.model = ModelConfig(path="nobody/not-cached-model")  # no identity to compare
    with pytest.raises(UserError, match="belongs to another run \\(model.path was "):
        check_same_run(folder.path, hub)
