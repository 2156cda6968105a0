"""`python -m mipo_mlx.train` with bad input: exit status 2 and one line on stderr.

The commands' `main(argv)` run in this process (tests/in_process.py); `--help` is also run
once as `python -m mipo_mlx.train` in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mipo_mlx.engine.toy import build_model_folder

from .in_process import run_main


@pytest.fixture
def run_train(capfd):
    """`python -m mipo_mlx.train ARGS` in `cwd`, run in this process: its main(argv)."""

    def run(*args, cwd) -> subprocess.CompletedProcess:
        return run_main("train", args, capfd, cwd=cwd)

    return run


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """Assert the user-error contract and return the message after 'error: '."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert proc.returncode == 2, proc.stderr
    return lines[0][len("error: ") :]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("toy") / "model")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "What is 2 + 2?"},
        {"prompt": "Name a red planet."},
        {"prompt": "Say hello."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_help_exits_zero(tmp_path):
    # In a process of its own: a fresh interpreter proves `python -m mipo_mlx.train` itself
    # exits 0 with nothing on stderr, nothing printed while the package imports included
    # (in this process it was imported long before)
    proc = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m mipo_mlx.train")
    assert "--training.learning_rate" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("command", ["train", "evaluate", "export"])
def test_help_reads_at_a_glance(command, tmp_path, capfd):
    """One short usage line, then the description, then the options grouped by section."""
    with pytest.raises(SystemExit) as exited:  # argparse's exit, status 0 under python -m
        run_main(command, ["--help"], capfd, cwd=tmp_path, env={"COLUMNS": "100"})
    stdout, stderr = capfd.readouterr()
    assert exited.value.code == 0, stderr
    usage, blank, description = stdout.splitlines()[:3]
    assert usage.startswith(f"usage: python -m mipo_mlx.{command} ") and len(usage) <= 160
    assert blank == "" and description.startswith(("MIPO", "`python -m"))
    if command != "export":
        assert usage.endswith("[--section.key VALUE ...]") and "--output DIR" in usage
        assert "--training.learning_rate" not in usage
        headings = [line for line in stdout.splitlines() if line.endswith(" settings:")]
        assert headings[:3] == ["model settings:", "lora settings:", "data settings:"]
    else:
        assert "--adapters RUN_DIR --output DIR" in usage


def test_unknown_cli_key(tmp_path, run_train):
    # BUG: argparse reports it: the full usage (about 50 lines) and then
    # "python -m mipo_mlx.train: error: unrecognized arguments: ...", with no
    # did-you-mean hint, unlike an unknown key in the YAML file.
    proc = run_train(
        "--model", "m", "--prompts", "p.jsonl", "--training.learnin_rate", "1e-4", cwd=tmp_path
    )
    message = one_error_line(proc)
    assert "training.learnin_rate" in message
    assert "training.learning_rate" in message  # the did-you-mean hint


def test_bad_yaml_file_names_the_line(tmp_path, run_train):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "model:\n  path: m\ntraining:\n  beta: [0.1\n  loss: sigmoid\n", encoding="utf-8"
    )
    message = one_error_line(run_train("--config", config, cwd=tmp_path))
    assert message.startswith(f"{config} line 5: not valid YAML (")


def test_unknown_key_in_yaml_file(tmp_path, run_train):
    config = tmp_path / "typo.yaml"
    config.write_text("training:\n  learning_rat: 0.001\n", encoding="utf-8")
    message = one_error_line(run_train("--config", config, cwd=tmp_path))
    assert (
        message
        == f"{config}: unknown key 'training.learning_rat' (did you mean 'training.learning_rate'?)"
    )


def test_missing_config_file(tmp_path, run_train):
    message = one_error_line(run_train("--config", tmp_path / "nope.yaml", cwd=tmp_path))
    assert message == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_config_is_a_folder(tmp_path, run_train):
    # BUG: IsADirectoryError from load_yaml escapes as a traceback (exit 1).
    (tmp_path / "configs").mkdir()
    message = one_error_line(run_train("--config", tmp_path / "configs", cwd=tmp_path))
    assert "configs" in message


def test_missing_model(tmp_path, run_train):
    message = one_error_line(run_train("--prompts", "p.jsonl", cwd=tmp_path))
    assert message == "model.path is not set: pass --model <repo-or-folder> or set it in the config"


def test_missing_prompts(tmp_path, run_train):
    message = one_error_line(run_train("--model", "org/model", cwd=tmp_path))
    assert message == "data.prompts is not set: pass --prompts <file.jsonl> or set it in the config"


def test_bad_value_on_cli(tmp_path, run_train):
    message = one_error_line(
        run_train("--model", "m", "--prompts", "p", "--lora.rank", "0", cwd=tmp_path)
    )
    assert message == "command line: 'lora.rank' must be at least 1, got 0"


def test_earlier_run_is_refused_and_left_unchanged(tmp_path, model_folder, prompts_file, run_train):
    out = tmp_path / "run"
    out.mkdir()
    before = {
        "config.yaml": b"model:\n  path: earlier\n",
        "metrics.jsonl": b'{"step": 1, "loss": 0.69}\n',
        "notes.txt": b"keep me\n",
        "written.jsonl": b'{"name": "config.yaml"}\n{"name": "metrics.jsonl"}\n',
    }
    for name, data in before.items():
        (out / name).write_bytes(data)
    proc = run_train(
        "--model",
        model_folder,
        "--prompts",
        prompts_file,
        "--output",
        out,
        "--iters",
        "1",
        cwd=tmp_path,
    )
    message = one_error_line(proc)
    assert message == (
        f"{out}: holds an earlier run (config.yaml, metrics.jsonl); choose another "
        "output.dir or pass --output.overwrite true"
    )
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before


# ---------------------------------------------------------------- the last-resort handler


def bug(*args, **kwargs):
    return 1 / 0


@pytest.mark.parametrize(
    "command, where, argv",
    [
        ("train", "quick_trial", ["--model", "m", "--prompts", "p"]),
        ("evaluate", "resolve", ["--model", "m", "--prompts", "p"]),
        ("export", "check_export_place", ["--adapters", ".", "--output", "f"]),
    ],
)
def test_an_error_no_check_caught_is_one_line_naming_its_saved_traceback(
    command, where, argv, tmp_path, monkeypatch, capsys
):
    """A bug escaping every check in any command: one line naming the file that keeps the full
    traceback (in the system temp folder), and exit status 1."""
    import importlib
    import tempfile

    module = importlib.import_module(f"mipo_mlx.{command}")
    monkeypatch.setattr(module, where, bug)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert module.main(argv) == 1
    err = capsys.readouterr().err
    (saved,) = tmp_path.glob("mipo_mlx-crash-*.txt")
    assert err == (
        f"error: internal error in mipo_mlx.{command} (ZeroDivisionError: division by zero); "
        f"the full traceback is in {saved}: please report it with that file\n"
    )
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text
    assert text.rstrip().endswith("ZeroDivisionError: division by zero") and "in bug" in text


def test_with_nowhere_to_save_it_the_traceback_is_printed(tmp_path, monkeypatch, capsys):
    import tempfile

    from mipo_mlx import train

    monkeypatch.setattr(train, "quick_trial", bug)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    assert train.main(["--model", "m", "--prompts", "p"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().endswith("division by zero")
