"""The optimizers (training.optimizer, training.optimizer_config): each one's checkpoint resumes
to the very adapters of an uninterrupted run; the settings are checked before any model loads;
the default is the AdamW the trainer always built."""

from __future__ import annotations

import inspect
import itertools
import json
import subprocess

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from mipo_mlx.core.config import OPTIMIZERS, Config, LoraConfig, ModelConfig, TrainingConfig
from mipo_mlx.core.errors import UserError
from mipo_mlx.core.settings import from_dict, optimizer_kwargs, resolve, validate
from mipo_mlx.engine import model as mdl
from mipo_mlx.engine import train_state as ckpt
from mipo_mlx.engine.batching import pack_pairs
from mipo_mlx.engine.lora import adapter_weights, attach_lora
from mipo_mlx.engine.scoring import score_pairs
from mipo_mlx.engine.trainer import OPTIMIZER_CLASSES, fit, make_loss, make_optimizer, schedule
from mipo_mlx.train import read_command_line

from .builders import hooks, made_up_pairs
from .in_process import run_main

STEPS, CHECKPOINT_AT = 5, 2
# Each optimizer with keywords under which every part of its state moves (SGD keeps no
# momentum by default; Adafactor's first moment is there only with beta_1)
CASES = {
    "adam": {},
    "adamw": {"weight_decay": 0.01},
    "muon": {},
    "sgd": {"momentum": 0.9},
    "adafactor": {},
    "adafactor+beta_1": {"beta_1": 0.9},
}


def training(case: str) -> TrainingConfig:
    name = case.split("+")[0]
    return TrainingConfig(
        optimizer=name,
        optimizer_config=CASES[case],
        learning_rate=1e-3 if name != "sgd" else 0.5,
        warmup_fraction=0.4,  # the learning rate changes across the checkpoint
        checkpoint_every=CHECKPOINT_AT,
    )


@pytest.fixture(scope="module")
def scored(toy_model_dir):
    """The pairs with their reference log-probs (the base model's), scored once."""
    model, _, _ = mdl.load(ModelConfig(path=str(toy_model_dir)))
    pairs = made_up_pairs(8, seed=1)
    for p, (c, r) in zip(pairs, score_pairs(model, pairs, 0, 4)):
        p.reference_logps = {"chosen": c, "rejected": r}
    return pairs


def fresh_model(model_dir):
    """The toy model with LoRA whose B is not 0, so every adapter matrix moves at once."""
    model, _, _ = mdl.load(ModelConfig(path=str(model_dir)))
    attach_lora(model, LoraConfig(rank=4), seed=0)
    mx.random.seed(3)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)
    mx.eval(model.parameters())
    return model


def batches(pairs, start: int = 0):
    """Batch k of the stream is a pure function of k: a resumed run skips what was consumed."""
    stream = (pack_pairs(pairs[(k % 2) * 4 : (k % 2) * 4 + 4], 0) for k in itertools.count())
    return itertools.islice(stream, start, None)


def adapters(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in adapter_weights(model).items()}


def train(model_dir, pairs, config, resume=None, **calls):
    model = fresh_model(model_dir)
    start = resume.batches_done if resume is not None else 0
    fit(
        model,
        make_loss(config),
        batches(pairs, start),
        STEPS,
        config,
        hooks(**calls),
        resume=resume,
    )
    return adapters(model)


@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_run_ends_with_the_adapters_of_an_uninterrupted_one(
    case, toy_model_dir, scored, tmp_path
):
    """STEPS steps, a checkpoint at step CHECKPOINT_AT kept on disk; a fresh model and
    optimizer restored from it and trained to STEPS: the same adapters, to the bit. Restored
    with its adapters but a fresh optimizer state instead, the run ends elsewhere: the state
    is what carries the run on."""
    config = training(case)
    keep = lambda state: state.step == CHECKPOINT_AT and ckpt.save(tmp_path, state)  # noqa: E731
    straight = train(toy_model_dir, scored, config, on_checkpoint=keep)
    state = ckpt.load(tmp_path)
    assert state.step == CHECKPOINT_AT and state.batches_done == CHECKPOINT_AT
    saved = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert saved["optimizer"] == config.optimizer
    for key, value in optimizer_kwargs(config).items():
        assert saved["optimizer_config"][key] == value, key
    assert set(saved["optimizer_config"]) == set(OPTIMIZERS[config.optimizer])
    at_checkpoint = state.adapters
    resumed = train(toy_model_dir, scored, config, resume=state)
    for k, v in straight.items():
        assert not np.array_equal(v, np.array(at_checkpoint[k])), f"{k} did not move after it"
        np.testing.assert_array_equal(resumed[k], v, err_msg=k)

    blank = make_optimizer(config, STEPS)
    blank.init(fresh_model(toy_model_dir).trainable_parameters())
    fresh = dict(tree_flatten(blank.state))
    moments = [k for k in fresh if k not in ("step", "learning_rate")]
    assert moments, "the optimizer keeps no state per adapter matrix"
    state = ckpt.load(tmp_path)
    state.optimizer.update({k: fresh[k] for k in moments})
    forgetful = train(toy_model_dir, scored, config, resume=state)
    assert any(not np.array_equal(forgetful[k], v) for k, v in straight.items())


def test_every_optimizers_state_is_arrays_that_survive_the_file(toy_model_dir, scored, tmp_path):
    """After a step, each optimizer's state is arrays only (nothing a safetensors file drops),
    and reads back with its keys, shapes, dtypes and values; Adafactor's factored moments are
    shaped by a row and a column of their matrix."""
    for case in CASES:
        config = training(case)
        model = fresh_model(toy_model_dir)
        optimizer = make_optimizer(config, STEPS)
        fit(model, make_loss(config), batches(scored), 1, config, optimizer=optimizer)
        state = ckpt.capture(model, optimizer, 1, 1)
        leaves = tree_flatten(optimizer.state)
        assert all(isinstance(v, mx.array) for _, v in leaves), case
        ckpt.save(tmp_path / case, state)
        again = ckpt.load(tmp_path / case)
        assert set(again.optimizer) == set(state.optimizer), case
        for k, v in state.optimizer.items():
            assert again.optimizer[k].dtype == v.dtype, (case, k)
            np.testing.assert_array_equal(np.array(again.optimizer[k]), np.array(v), err_msg=k)
        if config.optimizer == "adafactor":
            weights = dict(tree_flatten(model.trainable_parameters()))
            for k, w in weights.items():
                assert state.optimizer[f"{k}.exp_avg_sq_row"].shape == w.shape[:-1]
                assert state.optimizer[f"{k}.exp_avg_sq_col"].shape == w.shape[:-2] + w.shape[-1:]


def test_every_rank_hears_which_optimizer_made_the_checkpoint(toy_model_dir, tmp_path, monkeypatch):
    """With several ranks, rank 0 reads the checkpoint and sends what it found: the optimizer's
    name and keywords travel with the step (here two ranks, played by this process)."""
    from mipo_mlx.engine import distributed as dist

    model = fresh_model(toy_model_dir)
    made = make_optimizer(TrainingConfig(optimizer="muon"), STEPS)
    made.init(model.trainable_parameters())
    ckpt.save(tmp_path, ckpt.capture(model, made, 1, 1))
    monkeypatch.setattr(dist, "size", lambda: 2)
    monkeypatch.setattr(dist, "decided", lambda decide: json.loads(json.dumps(decide())))
    monkeypatch.setattr(dist, "broadcast_arrays", lambda arrays: arrays)
    state = ckpt.load_on_every_rank(tmp_path)
    assert state.optimizer_name == "muon"
    assert state.optimizer_config == ckpt.optimizer_settings(made)
    assert state.optimizer_config["momentum"] == 0.95


@pytest.mark.parametrize(
    "saved_with, resumed_with",
    [("adam", "adamw"), ("sgd", "muon"), ("adamw", "adafactor"), (None, "adam")],
)
def test_a_checkpoint_of_another_optimizer_is_refused(
    toy_model_dir, tmp_path, saved_with, resumed_with
):
    """Adam's and AdamW's states (and SGD's and Muon's) fit each other key by key: the name in
    state.json refuses them, in one line naming the folder, before anything is loaded. A
    checkpoint saved before the name was kept (None) was AdamW's."""
    model = fresh_model(toy_model_dir)
    made = make_optimizer(TrainingConfig(optimizer=saved_with or "adamw"), STEPS)
    made.init(model.trainable_parameters())
    state = ckpt.capture(model, made, 1, 1)
    state.optimizer_name = saved_with if saved_with else None
    ckpt.save(tmp_path, state)
    state = ckpt.load(tmp_path)
    other = fresh_model(toy_model_dir)
    before = adapters(other)
    with pytest.raises(UserError) as err:
        ckpt.restore(other, make_optimizer(TrainingConfig(optimizer=resumed_with), STEPS), state)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "checkpoint"))
    assert f"made with training.optimizer={saved_with or 'adamw'}, not {resumed_with}" in message
    assert "delete the checkpoint folder" in message
    assert all(np.array_equal(before[k], v) for k, v in adapters(other).items())


def test_the_default_is_the_adamw_the_trainer_always_built(toy_model_dir, scored):
    """Trained with the default settings, or with AdamW built as make_optimizer built it
    before there was a choice: the very same adapters."""
    config = TrainingConfig(learning_rate=1e-3)
    built = make_optimizer(config, STEPS)
    assert type(built) is optim.AdamW
    assert (built.betas, built.eps, built.weight_decay, built.bias_correction) == (
        [0.9, 0.95],
        1e-8,
        0.0,
        False,
    )
    as_before = optim.AdamW(
        learning_rate=schedule(config, STEPS),
        betas=[config.adam_beta1, config.adam_beta2],
        weight_decay=config.weight_decay,
    )
    runs = []
    for optimizer in (None, as_before):
        model = fresh_model(toy_model_dir)
        fit(model, make_loss(config), batches(scored), STEPS, config, optimizer=optimizer)
        runs.append(adapters(model))
    for k, v in runs[0].items():
        np.testing.assert_array_equal(v, runs[1][k], err_msg=k)


# ---------------------------------------------------------------- the table and the classes


def test_the_table_names_each_class_keyword_but_the_learning_rate():
    """config.OPTIMIZERS (read without mlx) holds each class's keywords, no more, no less, and
    each kind fits the class's default; the names are mlx-lm's."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    assert set(OPTIMIZERS) == set(OPTIMIZER_CLASSES) == set(CONFIG_DEFAULTS["optimizer_config"])
    assert set(TrainingConfig.__dataclass_fields__["optimizer"].metadata["choices"]) == set(
        OPTIMIZERS
    )
    for name, cls in OPTIMIZER_CLASSES.items():
        assert cls.__name__.lower() == name  # what a checkpoint records
        params = dict(inspect.signature(cls.__init__).parameters)
        params.pop("self"), params.pop("learning_rate")
        assert set(params) == set(OPTIMIZERS[name]), name
        for key, (form, _, _) in OPTIMIZERS[name].items():
            default = params[key].default
            fits = {
                "bool": lambda d: isinstance(d, bool),
                "int": lambda d: type(d) is int,
                "float": lambda d: isinstance(d, float),
                "float or null": lambda d: d is None or isinstance(d, float),
                "2 floats": lambda d: len(d) == 2 and all(isinstance(x, float) for x in d),
            }[form]
            assert fits(default), (name, key, default)


def test_each_optimizer_is_built_with_what_its_settings_say():
    """optimizer_config's keys reach the class; for the rest adam_beta1/2 give adam's and
    adamw's betas, weight_decay every weight decay, and adafactor steps by the schedule."""
    cases = [
        (TrainingConfig(optimizer="adam", adam_beta2=0.99), {"betas": [0.9, 0.99]}),
        (
            TrainingConfig(optimizer="adamw", optimizer_config={"betas": [0.8, 0.9], "eps": 1e-6}),
            {"betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.0},
        ),
        (
            TrainingConfig(optimizer="muon", weight_decay=0.1),
            {"weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "ns_steps": 5},
        ),
        (
            TrainingConfig(optimizer="sgd", optimizer_config={"momentum": 0.9, "nesterov": True}),
            {"momentum": 0.9, "nesterov": True, "weight_decay": 0.0, "dampening": 0.0},
        ),
        (
            TrainingConfig(optimizer="adafactor", optimizer_config={"relative_step": True}),
            {"relative_step": True, "scale_parameter": False, "beta_1": None},
        ),
    ]
    for config, held in cases:
        built = make_optimizer(config, 10)
        assert type(built) is OPTIMIZER_CLASSES[config.optimizer]
        assert {k: getattr(built, k) for k in held} == held, config.optimizer
        assert built.learning_rate.item() == pytest.approx(schedule(config, 10)(mx.array(0)).item())


# ---------------------------------------------------------------- checked before any model loads


def checked(**training) -> Config:
    config = Config()
    config.model.path, config.data.prompts = "no/such-model", "no-such-prompts.jsonl"
    for key, value in training.items():
        setattr(config.training, key, value)
    return validate(config)


def refused(**training) -> str:
    with pytest.raises(UserError) as err:
        checked(**training)
    message = str(err.value)
    assert "\n" not in message
    return message


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(list(OPTIMIZERS)), key=st.text(max_size=30), value=st.floats())
def test_a_key_the_optimizer_does_not_take_is_refused_in_one_line(name, key, value):
    if key in OPTIMIZERS[name]:
        return
    message = refused(optimizer=name, optimizer_config={key: value})
    assert message.startswith("settings: ")
    assert repr(f"training.optimizer_config.{key}")[1:41] in message  # the key, as text shows it
    if "\x00" in key or any("\ud800" <= c <= "\udfff" for c in key):
        return  # a NUL or a lone surrogate: the message says what to remove
    assert "learning rate" in message if key == "learning_rate" else f"{name} takes " in message


@pytest.mark.parametrize(
    "name, given, fragment",
    [
        ("sgd", {"momentum": "fast"}, "'training.optimizer_config.momentum' must be a number"),
        ("sgd", {"nesterov": 1}, "'training.optimizer_config.nesterov' must be true or false"),
        ("muon", {"ns_steps": 2.5}, "'training.optimizer_config.ns_steps' must be an integer"),
        ("muon", {"ns_steps": 0}, "'training.optimizer_config.ns_steps' must be at least 1"),
        ("adam", {"betas": [0.9]}, "'training.optimizer_config.betas' must be a list of two"),
        ("adam", {"betas": [0.9, 1.0]}, "'training.optimizer_config.betas' must be at most"),
        ("adamw", {"eps": -1.0}, "'training.optimizer_config.eps' must be at least 0"),
        ("adamw", {"eps": "1e999"}, "'training.optimizer_config.eps' must be a finite number"),
        ("adafactor", {"beta_1": "x"}, "'training.optimizer_config.beta_1' must be a number"),
        ("adafactor", {"eps": 1e-3}, "'training.optimizer_config.eps' must be a list of two"),
        ("sgd", {"learning_rate": 0.1}, "is not taken: the schedule sets the learning rate"),
        ("sgd", {"nesterov": True}, "nesterov needs a momentum above 0"),
    ],
)
def test_a_value_of_the_wrong_kind_is_refused_in_one_line(name, given, fragment):
    assert fragment in refused(optimizer=name, optimizer_config=given)


def test_a_mapping_per_optimizer_as_in_mlx_lm_is_refused_with_a_hint():
    message = refused(optimizer="sgd", optimizer_config={"sgd": {"momentum": 0.9}})
    assert "not one mapping per optimizer" in message


@pytest.mark.parametrize(
    "training, fragment",
    [
        (
            {"optimizer": "adamw", "optimizer_config": {"betas": [0.8, 0.9]}, "adam_beta1": 0.7},
            "training.optimizer_config.betas replaces training.adam_beta1; set one of the two",
        ),
        (
            {"optimizer": "sgd", "optimizer_config": {"weight_decay": 0.1}, "weight_decay": 0.2},
            "training.optimizer_config.weight_decay replaces training.weight_decay",
        ),
        (
            {"optimizer": "muon", "adam_beta2": 0.99},
            "training.adam_beta2=0.99 has no effect on training.optimizer=muon (only adam, adamw",
        ),
        (
            {"optimizer": "adam", "weight_decay": 0.1},
            "training.weight_decay=0.1 has no effect on training.optimizer=adam",
        ),
    ],
)
def test_a_training_key_that_clashes_or_does_nothing_is_refused(training, fragment):
    assert fragment in refused(**training)


def test_the_train_command_refuses_a_bad_key_before_it_looks_for_the_model(capfd, tmp_path):
    """The model and prompts do not exist: only a check made before either is read answers
    with the key's own message."""
    proc = run_main(
        "train",
        [
            "--model",
            tmp_path / "no-model",
            "--prompts",
            tmp_path / "no.jsonl",
            "--output",
            tmp_path / "out",
            "--training.optimizer",
            "sgd",
            "--training.optimizer_config",
            '{"momentun": 0.9}',
        ],
        capfd,
    )
    assert proc.returncode == 2 and isinstance(proc, subprocess.CompletedProcess)
    assert proc.stderr.strip().splitlines() == [
        "error: settings: unknown key 'training.optimizer_config.momentun' for "
        "training.optimizer=sgd (did you mean 'momentum'?); sgd takes momentum, weight_decay, "
        "dampening, nesterov"
    ]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a mapping-valued setting


def test_optimizer_config_is_a_mapping_in_yaml_json_on_the_command_line_and_in_python(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  optimizer: sgd\n  optimizer_config:\n    momentum: 0.9\n")
    from_yaml = resolve(str(path), {})
    assert from_yaml.training.optimizer_config == {"momentum": 0.9}
    yaml_path, overrides = read_command_line(
        [
            "--config",
            str(path),
            "--training.optimizer_config",
            '{"momentum": 0.5, "nesterov": true}',
        ]
    )
    assert resolve(yaml_path, overrides).training.optimizer_config == {
        "momentum": 0.5,
        "nesterov": True,
    }
    # In Python: a tuple for a list, '1e-8' (as PyYAML reads 1e-8) for a number, made plain
    config = checked(optimizer="adamw", optimizer_config={"betas": (0.8, 0.9), "eps": "1e-8"})
    assert config.training.optimizer_config == {"betas": [0.8, 0.9], "eps": 1e-8}
    again = from_dict(
        yaml.safe_load(
            yaml.safe_dump(
                json.loads(
                    json.dumps(
                        {
                            "training": {
                                "optimizer": "adamw",
                                "optimizer_config": config.training.optimizer_config,
                            }
                        }
                    )
                )
            )
        ),
        "x",
    )
    assert again.training == config.training
    assert Config().training.optimizer_config == {} and Config().training.optimizer == "adamw"
    assert Config().training.optimizer_config is not Config().training.optimizer_config


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[1, 2]", "'training.optimizer_config' must be a mapping of names to values"),
        ("5", "'training.optimizer_config' must be a mapping"),
        ("{1: 2}", "'training.optimizer_config' must be a mapping"),
        ("{a", "--training.optimizer_config '{a' is not a valid value"),
    ],
)
def test_a_command_line_value_that_is_no_mapping_is_refused(text, fragment):
    with pytest.raises(UserError) as err:
        yaml_path, overrides = read_command_line(["--training.optimizer_config", text])
        resolve(yaml_path, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)
