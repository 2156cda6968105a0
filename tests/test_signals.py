"""Stopping: the first SIGINT/SIGTERM stops any stage at its next safe point, in one line and
exit status 130; during start-up it ends the command in one line, never a traceback. The
Python API runs from any thread (no signal handling there). Each signal here is a real one,
sent to this process at a chosen point of the program."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from mipo_mlx import evaluate as evaluate_cli
from mipo_mlx import pipeline, train
from mipo_mlx.core.config import Config
from mipo_mlx.stages import evaluation

from .builders import run_args, write_prompts

FAST = ["--generation.max_tokens", "3", "--generation.truncated", "keep", "--iters", "1"]
EVAL_FAST = ["--evaluation.max_tokens", "3", "--evaluation.pmi_negatives", "1"]
QUIET = ["--evaluation.plots", "false"]


class Unhandled(Exception):
    """What a signal raises where the program left it to its default action (which, for
    SIGTERM, would end the test run itself)."""


@pytest.fixture
def guarded():
    """SIGINT/SIGTERM raise `Unhandled` unless the program installs its own handling."""

    def unhandled(signum, frame):
        raise Unhandled(signal.Signals(signum).name)

    previous = {s: signal.signal(s, unhandled) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in previous.items():
        signal.signal(s, h)


def signal_at(monkeypatch, module, name: str, signum: int, when=lambda *a, **k: True):
    """Send `signum` to this process as `module.name` is called (where `when` says so)."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.fixture
def heldout(tmp_path):
    path = tmp_path / "heldout.jsonl"
    rows = [{"prompt": f"Tom has {i} apples. How many?", "answer": str(i)} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_first_sigint_in_the_final_evaluation_stops_train(
    toy_model_dir, tmp_path, heldout, monkeypatch, capsys, guarded
):
    """SIGINT as the trained adapters start answering: the run stops there (it used to run the
    evaluation to its end), the adapters stay saved, and no report is written."""
    prompts = write_prompts(tmp_path / "p.jsonl", n=4)
    out = tmp_path / "run"
    signal_at(
        monkeypatch, evaluation, "answer_and_measure", signal.SIGINT, lambda *a, **k: a[7] == "mipo"
    )
    args = run_args(toy_model_dir, prompts, out, *FAST, "--evaluation.prompts", heldout)
    assert train.main([*args, *EVAL_FAST, *QUIET]) == 130
    said = capsys.readouterr().err.strip().splitlines()  # progress lines, then the stop
    assert said[-1] == (
        "stopped during the evaluation (mipo); finished work is saved. "
        f"Resume with: python -m mipo_mlx.train --resume {out}"
    )
    assert not any(line.startswith(("answer (mipo)", "PMI (mipo)")) for line in said)
    assert (out / "adapters.safetensors").is_file() and not (out / "eval.json").exists()


def test_first_sigterm_stops_evaluate_and_writes_no_report(
    toy_model_dir, tmp_path, heldout, monkeypatch, capsys, guarded
):
    out = tmp_path / "ev"
    signal_at(monkeypatch, evaluation, "generate_all", signal.SIGTERM)
    args = ["--model", str(toy_model_dir), "--prompts", str(heldout), "--output", str(out)]
    assert evaluate_cli.main([*args, *EVAL_FAST, *QUIET]) == 130
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1] == "stopped during the evaluation (base); no report written"
    assert not any(line.startswith("PMI (base)") for line in said)
    assert not list(out.glob("eval*"))


def test_a_signal_while_the_model_loads_stops_before_any_answer(
    toy_model_dir, tmp_path, heldout, monkeypatch, capsys, guarded
):
    from mipo_mlx.engine import model as mdl

    answered = []
    monkeypatch.setattr(evaluation, "generate_all", lambda *a, **k: answered.append(1))
    signal_at(monkeypatch, mdl, "load", signal.SIGINT)
    args = ["--model", str(toy_model_dir), "--prompts", str(heldout), "--output", str(tmp_path)]
    assert evaluate_cli.main(args) == 130
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1] == "stopped while the model loaded; no report written"
    assert not answered


def test_a_signal_while_train_loads_the_model_stops_before_the_first_stage(
    toy_model_dir, tmp_path, monkeypatch, capsys, guarded
):
    from mipo_mlx.engine import model as mdl

    out = tmp_path / "run"
    signal_at(monkeypatch, mdl, "load", signal.SIGTERM)
    args = run_args(toy_model_dir, write_prompts(tmp_path / "p.jsonl", n=4), out, *FAST)
    assert train.main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "stopped before the first stage; finished work is saved. "
        f"Resume with: python -m mipo_mlx.train --resume {out}"
    )
    assert (out / "config.yaml").is_file() and not list(out.glob("responses.*"))


def test_sigterm_during_start_up_inside_main_is_one_line(tmp_path, monkeypatch, capsys, guarded):
    """Before any stage installs its handler (settings read, backend checked), SIGTERM ends the
    command as Ctrl-C does: 'interrupted', exit 130, no traceback."""
    signal_at(monkeypatch, train, "resolve", signal.SIGTERM)
    assert train.main(["--model", "m", "--prompts", "p", "--output", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_package_imports_is_one_line(signum):
    """`python -m mipo_mlx.train` while the package is still importing (the BLAS loads, the
    command's module is not yet found): one line, exit 130, no traceback. The process is the
    command as Python starts it: sys.argv[0] is '-m' until the module is found."""
    code = (
        "import os, signal, sys, time\n"
        "sys.argv[0] = '-m'\n"
        "sys.orig_argv[1:] = ['-m', 'mipo_mlx.train']\n"
        "import mipo_mlx\n"
        f"os.kill(os.getpid(), {int(signum)})\n"
        "time.sleep(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "interrupted\n")


def test_the_api_runs_from_any_thread(toy_model_dir, tmp_path, heldout):
    """`run(config)` and `evaluate(config)` in a worker thread: no signal handler is set there
    (signal.signal would raise), and the signals of the main thread are left as they were."""
    config = Config()
    config.model.path, config.output.dir = str(toy_model_dir), str(tmp_path / "run")
    config.data.prompts = str(write_prompts(tmp_path / "p.jsonl", n=4))
    config.evaluation.prompts, config.evaluation.plots = str(heldout), False
    config.generation.max_tokens, config.generation.truncated = 3, "keep"
    config.training.iters, config.evaluation.max_tokens = 1, 3
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    results, failures = [], []

    def work():
        try:
            results.append(pipeline.run(config))
            results.append(pipeline.evaluate(config, str(tmp_path / "run")))
        except BaseException as err:  # noqa: BLE001  (reported by the assertion below)
            failures.append(err)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=300)
    assert not failures, failures
    assert (results[0].output / "adapters.safetensors").is_file()
    assert set(results[1]) == {"base", "mipo"} and results[1]["mipo"]["n"] == 4
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
