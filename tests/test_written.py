"""An overwrite removes only what runs recorded writing; a user's files in the folder stay."""

import json

import pytest
import yaml

from mipo_mlx.core import written
from mipo_mlx.core.config import Config, to_dict
from mipo_mlx.core.errors import UserError
from mipo_mlx.stages.run_folder import RunFolder, check_run_folder


def config_for(out, model, overwrite=True, rounds=1):
    config = Config()
    config.output.dir, config.output.overwrite = str(out), overwrite
    config.model.path, config.training.rounds = str(model), rounds
    return config


def users_files(out):
    (out / "round-robin-notes.txt").write_text("the user's")
    (out / "round-3").mkdir()  # looks like a run's, but no run of two rounds wrote it
    (out / "round-3" / "plan.md").write_text("the user's")
    (out / "eval_round-9.json").write_text("{}")
    return {"round-robin-notes.txt", "round-3", "eval_round-9.json"}


def test_overwrite_of_a_run_from_before_the_record_removes_only_its_exact_names(tmp_path):
    out, model = tmp_path / "run", tmp_path / "model"
    out.mkdir()
    model.mkdir()
    earlier = to_dict(config_for(out, model, rounds=2))
    earlier["output"]["dir"] = str(out)
    (out / "config.yaml").write_text(yaml.safe_dump(earlier))
    runs = {"pairs.jsonl", "metrics.jsonl", "eval_round-1.json", "round-1", "round-2"}
    for name in runs:
        (out / name).mkdir() if name.startswith("round-") else (out / name).write_text("x")
    (out / "checkpoint").mkdir()
    mine = users_files(out)
    config = config_for(out, model)
    check_run_folder(out, config, resume=False)
    RunFolder(out)._start(config)
    assert {p.name for p in out.iterdir()} == mine | {"config.yaml", written.RECORD}
    assert (out / "round-3" / "plan.md").read_text() == "the user's"


def test_overwrite_removes_what_the_record_holds_and_nothing_else(tmp_path):
    out, model = tmp_path / "run", tmp_path / "model"
    model.mkdir()
    folder = RunFolder(out)
    folder._start(config_for(out, model))
    folder.keep_inputs({"train_prompts": "abc"})
    folder.cached_json("eval_base.json", lambda: {"score": 1})
    folder.append_metrics({"step": 1})
    folder.round(2).append_metrics({"step": 1})
    assert written.recorded(out) >= {"config.yaml", "inputs.json", "metrics.jsonl", "round-2"}
    mine = users_files(out)
    (out / "notes.md").write_text("the user's")
    with pytest.raises(UserError, match="holds an earlier run"):
        check_run_folder(out, config_for(out, model, overwrite=False), resume=False)
    check_run_folder(out, config_for(out, model), resume=False)
    RunFolder(out)._start(config_for(out, model))
    assert {p.name for p in out.iterdir()} == mine | {"notes.md", "config.yaml", written.RECORD}


def test_a_users_file_under_a_name_a_run_writes_is_refused_overwrite_or_not(tmp_path):
    out, model = tmp_path / "mine", tmp_path / "model"
    out.mkdir()
    model.mkdir()
    (out / "pairs.jsonl").write_text("the user's own pairs\n")
    recipe = yaml.safe_dump(to_dict(Config()))  # every section, but not a run's copy
    (out / "config.yaml").write_text(recipe)
    for overwrite in (False, True):
        with pytest.raises(UserError) as err:
            check_run_folder(out, config_for(out, model, overwrite), resume=False)
        assert "holds config.yaml, pairs.jsonl, which no run of mipo_mlx wrote" in str(err.value)
    assert (out / "pairs.jsonl").read_text() == "the user's own pairs\n"
    assert (out / "config.yaml").read_text() == recipe


@pytest.mark.parametrize("given", ["", ".", "{model}", "{model}/run"])
def test_a_run_refuses_the_working_directory_and_the_model_folder(tmp_path, monkeypatch, given):
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.chdir(tmp_path)
    config = config_for(given.format(model=model), model)
    with pytest.raises(UserError, match="output.dir"):
        check_run_folder(RunFolder(config.output.dir).path, config, resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and not any(model.iterdir())


def test_the_record_drops_a_torn_last_line_and_refuses_a_name_aimed_elsewhere(tmp_path):
    record = tmp_path / written.RECORD
    record.write_text('{"name": "pairs.jsonl"}\n{"name": "metr')
    assert written.recorded(tmp_path) == {"pairs.jsonl"}
    for bad in ("../elsewhere", "", "a/b", 3):
        record.write_text(json.dumps({"name": bad}) + "\n" + '{"name": "x"}\n')
        with pytest.raises(UserError, match=f"{written.RECORD}: entry 1 is not a name a run wrote"):
            written.recorded(tmp_path)
