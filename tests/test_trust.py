"""A model's own code runs only when this command line allows it (model.trust_remote_code):
never because a run folder's config.yaml asks, as a shared run folder could (evaluate,
export, train --resume; the judge too, which follows model.trust_remote_code)."""

from __future__ import annotations

import json

import pytest
import yaml

from mipo_mlx import evaluate as evaluate_cli
from mipo_mlx import export, pipeline, train
from mipo_mlx.core.cli import run_config
from mipo_mlx.core.errors import UserError

from .builders import remote_code_model, run_args

NOTE = "sets model.trust_remote_code: true; not honoured from a run folder"


@pytest.fixture(scope="module")
def shared_run(toy_model_dir, tmp_path_factory):
    """A finished run as someone could share it: its config.yaml names a base model that ships
    code, and asks to run it."""
    root = tmp_path_factory.mktemp("shared")
    model = remote_code_model(toy_model_dir, root / "model")
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": f"{i} + 1?"}) + "\n" for i in range(3)))
    run = root / "run"
    fast = ["--iters", "1", "--generation.max_tokens", "3", "--generation.truncated", "keep"]
    assert train.main(run_args(toy_model_dir, heldout, run, *fast)) == 0
    settings = yaml.safe_load((run / "config.yaml").read_text())
    settings["model"].update(path=str(model), trust_remote_code=True)
    settings["evaluation"]["prompts"] = str(heldout)
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    return run, model / "RAN"


def one_note_then(err: str) -> list[str]:
    """The note, then the lines after it (progress lines aside)."""
    lines = [line for line in err.strip().splitlines() if " |" not in line]
    assert sum(NOTE in line for line in lines) == 1, lines
    assert lines[0].startswith("note: ") and NOTE in lines[0], lines
    return lines[1:]


def test_evaluate_does_not_run_the_code_a_shared_run_asks_for(shared_run, tmp_path, capsys):
    run, ran = shared_run
    assert evaluate_cli.main(["--adapters", str(run), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    rest = one_note_then(err)
    assert "pass --model.trust_remote_code true to allow it" in err
    assert len(rest) == 1 and "contains custom code" in rest[0], rest
    assert not ran.exists()


def test_export_does_not_run_the_code_a_shared_run_asks_for(shared_run, tmp_path, capsys):
    run, ran = shared_run
    assert export.main(["--adapters", str(run), "--output", str(tmp_path / "fused")]) == 2
    err = capsys.readouterr().err
    rest = one_note_then(err)
    assert "pass --trust-remote-code to allow it" in err
    assert len(rest) == 1 and "contains custom code" in rest[0], rest
    assert not ran.exists() and not (tmp_path / "fused").exists()


@pytest.fixture
def trust_seen(monkeypatch):
    """The model.trust_remote_code each model load is given (the load itself stops there)."""
    from mipo_mlx.engine import model as mdl

    seen: list[bool] = []

    def load(config):
        seen.append(config.trust_remote_code)
        raise UserError("load stopped by the test")

    def run(config, resume_run=False):
        seen.append(config.model.trust_remote_code)
        raise UserError("run stopped by the test")

    monkeypatch.setattr(mdl, "load", load)
    monkeypatch.setattr(pipeline, "run", run)
    return seen


@pytest.mark.parametrize(
    "command, allow",
    [
        ("evaluate", ["--model.trust_remote_code", "true"]),
        ("export", ["--trust-remote-code"]),
        ("resume", ["--model.trust_remote_code", "true"]),
    ],
)
def test_only_this_command_line_allows_a_models_code(
    command, allow, shared_run, tmp_path, trust_seen, capsys
):
    run, _ = shared_run
    args = {
        "evaluate": (evaluate_cli.main, ["--adapters", str(run), "--output", str(tmp_path)]),
        "export": (export.main, ["--adapters", str(run), "--output", str(tmp_path / "f")]),
        "resume": (train.main, ["--resume", str(run)]),
    }
    main, given = args[command]
    assert main(given) == 2 and main([*given, *allow]) == 2
    assert trust_seen == [False, True]
    assert capsys.readouterr().err.count(NOTE) == 2


def test_a_config_file_named_on_the_command_line_may_allow_it(
    shared_run, tmp_path, trust_seen, capsys
):
    run, _ = shared_run
    mine = tmp_path / "mine.yaml"
    mine.write_text((run / "config.yaml").read_text())  # the user's own copy: their choice
    given = ["--config", str(mine), "--adapters", str(run), "--output", str(tmp_path)]
    assert evaluate_cli.main(given) == 2
    assert trust_seen == [True] and NOTE not in capsys.readouterr().err


def test_run_config_keeps_every_other_setting(shared_run, capsys):
    run, _ = shared_run
    config = run_config(run, "--allow")
    assert config.model.trust_remote_code is False
    assert config.model.path.endswith("model") and config.evaluation.prompts.endswith(".jsonl")
    err = capsys.readouterr().err
    assert err == (
        f"note: {run / 'config.yaml'} sets model.trust_remote_code: true; not honoured from a "
        "run folder (the model's files could run code here); pass --allow to allow it\n"
    )
