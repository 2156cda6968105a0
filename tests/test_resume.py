"""Interrupted runs end where uninterrupted ones do: SIGKILL at steps, in generation, in writes."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mipo_mlx.core.files import MARK, partial_and_old

from .builders import run_args, write_prompts

# Whole runs killed (SIGKILL, SIGTERM) in processes of their own, then resumed
pytestmark = pytest.mark.integration

KILLER = str(Path(__file__).with_name("killer.py"))
ARGS = (
    "--generation.max_tokens 10 --generation.truncated keep --generation.temperature 1.0 "
    "--training.learning_rate 3e-3 --iters 12 --training.batch_size 2 "
    "--training.checkpoint_every 3 --training.save_every 4 --lora.rank 4 --lora.dropout 0.1 "
    "--data.valid_fraction 0.2 --training.valid_every 5"
).split()


def train_cmd(model_dir, prompts, out, *extra):
    return run_args(model_dir, prompts, out, *ARGS, *extra)


def run_killed(point, value, model_dir, prompts, out, *extra, cwd=None):
    done = subprocess.run(
        [
            sys.executable,
            KILLER,
            point,
            str(value),
            "--",
            *train_cmd(model_dir, prompts, out, *extra),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-2000:])


def resume(out, cwd=None):
    done = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", "--resume", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def adapters(out):
    return {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}


@pytest.fixture(scope="module")
def setup(toy_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    prompts = write_prompts(root / "prompts.jsonl", n=14)
    reference = root / "uninterrupted"
    done = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", *train_cmd(toy_model_dir, prompts, reference)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return toy_model_dir, prompts, reference, root


def assert_same_run(out, reference):
    a, b = adapters(out), adapters(reference)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    assert (out / "pairs.jsonl").read_bytes() == (reference / "pairs.jsonl").read_bytes()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # no step lost, none logged twice


KILL_STEPS = sorted(random.Random(20261126).sample(range(1, 12), 3))


@pytest.mark.parametrize("step", KILL_STEPS)
def test_sigkill_during_training_then_resume(setup, step):
    model_dir, prompts, reference, root = setup
    out = root / f"killed-step-{step}"
    run_killed("after-step", step, model_dir, prompts, out)
    assert not (out / "adapters.safetensors").exists() or step >= 4
    resume(out)
    assert_same_run(out, reference)


def test_resume_from_a_moved_folder_and_another_working_directory(setup):
    """A run started with relative paths, killed, moved, and resumed from elsewhere by a path
    spelled another way gives the uninterrupted run."""
    model_dir, prompts, reference, root = setup
    work = root / "work"
    work.mkdir()
    (work / "prompts.jsonl").write_bytes(prompts.read_bytes())
    run_killed("after-step", 5, model_dir, "prompts.jsonl", "out/run", cwd=work)
    moved = root / "elsewhere" / "run"
    moved.parent.mkdir()
    (work / "out" / "run").rename(moved)
    resume(Path("..") / "elsewhere" / "." / "run", cwd=root / "work")
    assert_same_run(moved, reference)
    assert not (work / "out" / "run").exists()  # nothing was written where it had been


def test_sigkill_during_generation_then_resume(setup):
    model_dir, prompts, reference, root = setup
    out = root / "killed-generation"
    run_killed("after-responses", 5, model_dir, prompts, out)
    saved = (out / "responses.chosen.jsonl").read_text().splitlines()
    assert len(saved) == 5 and not (out / "pairs.jsonl").exists()
    done = resume(out)
    assert "generate chosen" in done.stderr
    assert_same_run(out, reference)


def test_sigkill_between_checkpoint_renames(setup):
    model_dir, prompts, reference, root = setup
    out = root / "killed-checkpoint"
    run_killed("in-checkpoint", 6, model_dir, prompts, out)
    assert partial_and_old(out / "checkpoint")[1].is_dir() and not (out / "checkpoint").exists()
    resume(out)
    assert_same_run(out, reference)


def test_sigkill_during_adapter_write_keeps_the_previous_file(setup):
    model_dir, prompts, reference, root = setup
    out = root / "killed-write"
    run_killed("in-adapters-write", 2, model_dir, prompts, out)  # the second save: step 8
    step4 = adapters(out)  # the previous file is whole and loads
    assert step4.keys() == adapters(reference).keys()
    np.testing.assert_array_equal(
        step4[next(iter(step4))],
        np.array(mx.load(str(out / "0000004_adapters.safetensors"))[next(iter(step4))]),
    )
    assert list(out.glob(".adapters.safetensors.*"))  # the torn temporary file, never renamed
    resume(out)
    assert_same_run(out, reference)


def test_torn_last_metrics_line_is_dropped(setup):
    model_dir, prompts, reference, root = setup
    out = root / "torn"
    run_killed("after-step", 7, model_dir, prompts, out)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 8, "loss": 0.6')  # a line cut by the kill
    resume(out)
    assert_same_run(out, reference)


def test_resume_refuses_another_runs_settings(setup):
    _, _, reference, _ = setup
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mipo_mlx.train",
            "--resume",
            str(reference),
            "--training.beta",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "belongs to another run (training.beta" in done.stderr


def test_sigterm_finishes_the_step_and_checkpoints(setup):
    model_dir, prompts, reference, root = setup
    out = root / "sigterm"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "import mipo_mlx\n"
            "from mipo_mlx import train\n"
            "from mipo_mlx.stages import run_folder\n"
            "real = run_folder.append_jsonl\n"
            "def log(p, row):\n"
            "    real(p, row)\n"
            "    if row.get('step') == 5: os.kill(os.getpid(), signal.SIGTERM)\n"
            "run_folder.append_jsonl = log\n"
            "sys.exit(train.main(sys.argv[1:]))\n",
            *train_cmd(model_dir, prompts, out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Resume with: python -m mipo_mlx.train --resume" in stderr
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 5
    resume(out)
    assert_same_run(out, reference)


def test_a_second_run_on_a_folder_in_use_is_refused(setup):
    """While a run holds its folder, another run there (new, --overwrite or --resume) stops
    with one line naming the holder and changes nothing; once the holder is killed, the
    folder resumes."""
    model_dir, prompts, reference, root = setup
    out, go = root / "busy", root / "busy-go"
    first = subprocess.Popen(
        [sys.executable, KILLER, "wait-after-step", "5", "--", *train_cmd(model_dir, prompts, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KILLER_GO": str(go)},
    )
    try:
        check_the_folder_is_held(first, out, go, model_dir, prompts)
    finally:  # never leave the holder waiting, whatever failed
        go.touch()
        if first.wait(timeout=300) != -signal.SIGKILL:
            first.kill()
    resume(out)
    assert_same_run(out, reference)


def check_the_folder_is_held(first, out, go, model_dir, prompts):
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()

    def lasting():  # the holder runs on: its temporary files and folders come and go
        return {p.name for p in out.iterdir() if MARK not in p.name}

    before = lasting()
    for extra in ([], ["--output.overwrite", "true"]):
        second = subprocess.run(
            [sys.executable, "-m", "mipo_mlx.train", *train_cmd(model_dir, prompts, out), *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2 and "in use by process" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    busy = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", "--resume", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert busy.returncode == 2 and f"process {first.pid} " in busy.stderr, busy.stderr
    assert first.poll() is None  # the holder ran on undisturbed
    assert before <= lasting()
    go.touch()
    assert first.wait(timeout=300) == -signal.SIGKILL  # killed after step 5


def test_output_below_a_regular_file_is_one_line(setup, tmp_path):
    model_dir, prompts, _, _ = setup
    (tmp_path / "file").write_text("x")
    below = tmp_path / "file" / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mipo_mlx.train",
            *train_cmd(model_dir, prompts, below),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "cannot write there" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and (tmp_path / "file").read_text() == "x"


def test_prompts_reordered_or_edited_after_a_kill_are_refused(setup):
    """Cached answers belong to prompts by position: after a kill, a reordered or edited
    prompt file stops the resume with one line; restored, the run resumes as if never
    stopped."""
    model_dir, prompts, reference, root = setup
    mine = root / "edited-prompts.jsonl"
    original = prompts.read_bytes()
    mine.write_bytes(original)
    out = root / "killed-then-edited"
    run_killed("after-responses", 6, model_dir, mine, out)
    lines = original.decode().splitlines(keepends=True)
    for changed in (lines[1:] + lines[:1], [lines[0].replace("Case 0", "Case 99"), *lines[1:]]):
        mine.write_text("".join(changed))
        done = subprocess.run(
            [sys.executable, "-m", "mipo_mlx.train", "--resume", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2, done.stderr
        assert "the training prompts (data.prompts) changed" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    mine.write_bytes(original)
    resume(out)
    assert_same_run(out, reference)


@pytest.mark.parametrize("limit_kb", [1, 4, 24])
def test_disk_full_is_one_line_and_resumes(setup, tmp_path, limit_kb):
    """A file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored: writes past it fail as a full
    disk's do) stops the run at whichever write reaches it: one line, exit 2, no temporary
    file left, every file written before intact; with the limit lifted, the run resumes to
    the uninterrupted result."""

    model_dir, prompts, reference, _ = setup
    out = tmp_path / "run"

    # The limit is set once mipo_mlx has loaded its BLAS (an in-memory library copy counts
    # against RLIMIT_FSIZE too, where a full disk would not touch it), then the command runs.
    small_disk = (
        "import runpy, signal, resource, sys, mipo_mlx\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_kb * 1024}, {limit_kb * 1024}))\n"
        "sys.argv = ['mipo_mlx.train', *sys.argv[1:]]\n"
        "runpy.run_module('mipo_mlx.train', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", small_disk, *train_cmd(model_dir, prompts, out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-2000:]
    assert "resume" in lines[0]
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or ".partial" in p.name]
    assert leftovers == [], leftovers
    if (out / "config.yaml").is_file():
        resume(out)
    else:  # stopped before the run began: run it again
        again = [sys.executable, "-m", "mipo_mlx.train", *train_cmd(model_dir, prompts, out)]
        assert subprocess.run(again, capture_output=True, timeout=300).returncode == 0
    assert_same_run(out, reference)


def test_checkpoint_made_from_other_pairs_is_refused(setup):
    """pairs.jsonl edited after a checkpoint: resuming stops with one line (the checkpoint
    trained on other pairs); restored, the run resumes to the uninterrupted result."""
    model_dir, prompts, reference, root = setup
    out = root / "killed-then-pairs-edited"
    run_killed("after-step", 5, model_dir, prompts, out)
    original = (out / "pairs.jsonl").read_bytes()
    rows = [json.loads(line) for line in original.decode().splitlines()]
    rows[0]["reference_logps"]["chosen"] += 1.0
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", "--resume", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "made from other pairs" in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) <= 3  # progress lines, then the one error
    assert done.stderr.strip().splitlines()[-1].startswith("error:")
    (out / "pairs.jsonl").write_bytes(original)
    resume(out)
    assert_same_run(out, reference)


def test_a_finished_run_without_its_adapters_resumes_to_every_output(setup, tmp_path):
    """Killed after its last checkpoint, before the adapters were written: the resume writes
    them from that checkpoint and reports the last step's loss, as the uninterrupted run."""
    _, _, reference, _ = setup
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "adapters.safetensors").unlink()
    done = resume(out)
    assert_same_run(out, reference)
    last = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"final loss {last['loss']:.4f}" in done.stdout, done.stdout


def test_pairs_without_reference_log_probs_are_scored_not_trained_against_zero(setup, tmp_path):
    """pairs.jsonl whose rows lack reference_logps (hand-made, or another tool's): the resume
    scores the reference first, so the run equals the one that scored its own pairs."""
    _, _, reference, _ = setup
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("checkpoint", "metrics.jsonl", "adapters.safetensors"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    (out / "pairs.jsonl").write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "reference_logps"}) + "\n" for r in rows
        )
    )
    done = resume(out)
    assert f"scored the reference log-probs of {len(rows)} pair(s)" in done.stderr
    assert_same_run(out, reference)
