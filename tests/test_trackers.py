"""training.report_to: what TensorBoard and W&B hold is read back from their own files and
compared with metrics.jsonl, config.yaml and the evaluation report, through a kill and a
resume; a tracker that cannot start stops the run before the model loads; one that fails
mid-run is one note."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto.wandb_internal_pb2 import Record

from mipo_mlx.stages import trackers
from mipo_mlx.train import main

from .builders import run_args, write_prompts

KILLER = str(Path(__file__).with_name("killer.py"))
# 6 steps, validated at 3 and 6, a checkpoint every 3 steps
ARGS = (
    "--generation.max_tokens 8 --generation.truncated keep --generation.temperature 1.0 "
    "--iters 6 --training.batch_size 2 --lora.rank 4 --data.valid_fraction 0.2 "
    "--training.valid_every 3 --training.checkpoint_every 3"
).split()
EVALUATION = "--evaluation.max_tokens 6 --evaluation.pmi_negatives 1".split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    heldout = root / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"prompt": f"Ann has {i} pens. How many?", "answer": str(i)}) + "\n"
            for i in range(3)
        )
    )
    return write_prompts(root / "prompts.jsonl", n=10), heldout


def train(args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mipo_mlx.train", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def train_killed_after_step(step: int, args, log: Path, env=None, cwd=None) -> None:
    """SIGKILLed right after `step` is in metrics.jsonl. Its output goes to a file: W&B's
    service process outlives its killed parent for a while and would hold a pipe open."""
    with open(log, "w") as out:
        code = subprocess.run(
            [sys.executable, KILLER, "after-step", str(step), "--", *map(str, args)],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
            env=env,
            cwd=cwd,
        ).returncode
    assert code == -9, log.read_text()[-2000:]


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars_of(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} as metrics.jsonl has them."""
    keys = sorted({k for row in rows for k in row} - {"step"})
    return {k: [(row["step"], row[k]) for row in rows if k in row] for k in keys}


def tensorboard_events(path: Path) -> EventAccumulator:
    """What TensorBoard itself reads from a folder (or one event file), nothing sampled away."""
    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    return events


def tensorboard_scalars(events: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {
        tag: [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def texts(events: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [
        (e.step, e.tensor_proto.string_val[0].decode())
        for e in events.Tensors(f"{tag}/text_summary")
    ]


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_holds_metrics_config_table_and_plots(inputs, toy_model_dir, tmp_path):
    """Every scalar is metrics.jsonl's value at its step (float32); config.yaml's settings are
    one text at step 0; eval.md and the PNGs are at the last step, byte for byte."""
    prompts, heldout = inputs
    out = tmp_path / "out"
    extra = ["--training.report_to", "tensorboard", "--evaluation.prompts", heldout]
    done = train(run_args(toy_model_dir, prompts, out, *ARGS, *EVALUATION, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note:" not in done.stderr
    events = tensorboard_events(out / "tensorboard")
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert tensorboard_scalars(events) == scalars_of(rows)
    assert "valid/loss" in events.Tags()["scalars"] and "tokens_per_sec" in scalars_of(rows)
    [(step, config)] = texts(events, "config")
    assert step == 0
    assert yaml.safe_load(textwrap.dedent(config)) == yaml.safe_load(
        (out / "config.yaml").read_text()
    )
    assert texts(events, "evaluation") == [(6, (out / "eval.md").read_text())]
    for name in ("eval", "training"):
        [image] = events.Images(f"plots/{name}")
        png = (out / f"{name}.png").read_bytes()
        assert (image.step, image.encoded_image_string) == (6, png)
        assert (image.width, image.height) == struct.unpack(">II", png[16:24])


@pytest.mark.integration  # a run killed in a process of its own, then resumed
def test_tensorboard_after_a_kill_and_resume_shows_the_resumed_steps(
    inputs, toy_model_dir, tmp_path
):
    """Killed after step 5 (checkpoint at 3; TensorBoard had steps 1-4): the resumed run logs
    metrics.jsonl's steps 1-3 and its own 4-6 into the same folder, and TensorBoard shows each
    step once, with the values metrics.jsonl kept: step 4's timing is the second attempt's."""
    prompts, _ = inputs
    out = tmp_path / "out"
    args = run_args(toy_model_dir, prompts, out, *ARGS, "--training.report_to", "tensorboard")
    train_killed_after_step(5, args, tmp_path / "killed.log")
    [first_file] = (out / "tensorboard").iterdir()
    first = tensorboard_scalars(tensorboard_events(first_file))
    assert [step for step, _ in first["loss"]] == [1, 2, 3, 4]
    done = train(["--resume", out])
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((out / "tensorboard").iterdir())) == 2  # the same folder, a file per attempt
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert tensorboard_scalars(tensorboard_events(out / "tensorboard")) == scalars_of(rows)
    assert first["step_seconds"][3] != (4, rows[3]["step_seconds"])  # step 4 was logged again


def test_a_new_run_in_the_folder_starts_anew_and_rounds_follow_each_other(
    inputs, toy_model_dir, tmp_path
):
    """A run, then a 2-round run over it (--output.overwrite): TensorBoard holds the second
    run alone, round 2's steps after round 1's (7-12 for round-2/metrics.jsonl's 1-6)."""
    prompts, _ = inputs
    out = tmp_path / "out"
    args = run_args(toy_model_dir, prompts, out, *ARGS, "--training.report_to", "tensorboard")
    again = ["--output.overwrite", "true", "--training.learning_rate", "1e-3"]
    for extra in ([], [*again, "--training.rounds", "2"]):
        done = train([*args, *extra])
        assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((out / "tensorboard").iterdir())) == 1
    events = tensorboard_events(out / "tensorboard")
    second = [{**row, "step": row["step"] + 6} for row in metrics_rows(out / "round-2")]
    assert tensorboard_scalars(events) == scalars_of(metrics_rows(out) + second)
    assert [step for step, _ in tensorboard_scalars(events)["loss"]] == list(range(1, 13))
    assert "learning_rate: 0.001" in texts(events, "config")[0][1]


# ---------------------------------------------------------------- Weights & Biases


def wandb_records(path: Path) -> list[Record]:
    """The records of a .wandb transaction log (LevelDB's log format: 32 KiB blocks of
    chunks, each with a 7-byte header: checksum, length, type), as `wandb sync` reads it."""
    data = path.read_bytes()
    if not data:  # a killed run's service may not have written anything yet
        return []
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records: list[Record]) -> dict[int, dict]:
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {
                i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            rows[row["_step"]] = row
    return rows


def wandb_config(records: list[Record]) -> dict:
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("config", "run"):
            items = r.config.update if kind == "config" else r.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.integration  # a run killed in a process of its own, then resumed
def test_wandb_offline_through_a_kill_and_resume(inputs, toy_model_dir, tmp_path):
    """Offline W&B, HOME and the working directory inside tmp_path: killed after step 5, then
    resumed. Both attempts are one W&B run (its id kept in wandb_run.json) in <output>/wandb;
    the resumed one holds every row of metrics.jsonl at its step with its values, then the
    evaluation table and plots; its config is config.yaml's; nothing lands in the working
    directory or the real HOME."""
    prompts, heldout = inputs
    out, cwd, home = tmp_path / "out", tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_MODE="offline", WANDB_SILENT="true")
    real_home = [Path.home() / p for p in (".config/wandb", ".cache/wandb", ".local/share/wandb")]
    before = [p.exists() and sorted(p.rglob("*")) for p in real_home]
    extra = ["--training.report_to", "wandb", "--evaluation.prompts", heldout]
    args = run_args(toy_model_dir, prompts, out, *ARGS, *EVALUATION, *extra)
    train_killed_after_step(5, args, tmp_path / "killed.log", env=env, cwd=cwd)
    done = train(["--resume", out], env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((out / "wandb_run.json").read_text())
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert [run.name.rsplit("-", 1)[1] for run in runs] == [saved["id"]] * 2
    assert saved["project"] == "mipo_mlx"
    first, second = (wandb_records(run / f"run-{saved['id']}.wandb") for run in runs)
    # The kill lost the rows W&B had not sent on; the resumed run sends every row again
    assert set(wandb_history(first)) <= {1, 2, 3, 4}
    history = wandb_history(second)
    rows = metrics_rows(out)
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    for row in rows:
        logged = history[row["step"]]
        assert {k: logged[k] for k in row if k != "step"} == pytest.approx(
            {k: v for k, v in row.items() if k != "step"}, rel=1e-12
        )
    table = json.loads((runs[1] / "files" / history[6]["evaluation.path"]).read_text())
    eval_md = [  # the table's lines (the answers side by side follow it)
        line.split("|")[1:-1]
        for line in (out / "eval.md").read_text().splitlines()
        if line.startswith("|")
    ]
    assert [table["columns"], *table["data"]] == [
        [cell.strip() for cell in line] for line in eval_md if "---" not in line[0]
    ]
    for name in ("eval", "training"):
        png = (out / f"{name}.png").read_bytes()
        assert history[6][f"plots/{name}._type"] == "image-file"
        assert history[6][f"plots/{name}.sha256"] == hashlib.sha256(png).hexdigest()
    assert [r.run.display_name for r in second if r.WhichOneof("record_type") == "run"] == ["out"]
    assert wandb_config(second) == yaml.safe_load((out / "config.yaml").read_text())
    assert not list(cwd.iterdir())
    assert [p.exists() and sorted(p.rglob("*")) for p in real_home] == before


# ---------------------------------------------------------------- failures


def no_slow_stage(monkeypatch):
    """Loading the model is the first slow stage: reaching it fails the test."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("mipo_mlx.engine.model.load", load)


def test_a_tracker_library_missing_stops_the_run_before_the_model_loads(
    inputs, toy_model_dir, tmp_path, monkeypatch, capsys
):
    prompts, _ = inputs
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    no_slow_stage(monkeypatch)
    out = tmp_path / "out"
    code = main(run_args(toy_model_dir, prompts, out, "--training.report_to", "wandb"))
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "error: training.report_to=wandb needs wandb, which did not import (import of wandb "
        "halted; None in sys.modules): pip install -U 'mipo_mlx[wandb]', or set "
        "training.report_to: none\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_a_file_where_the_tracker_writes_stops_the_run_before_the_model_loads(
    kind, inputs, toy_model_dir, tmp_path, monkeypatch, capsys
):
    prompts, _ = inputs
    no_slow_stage(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / kind).write_text("a file, not a folder")
    code = main(run_args(toy_model_dir, prompts, out, "--training.report_to", kind))
    err = capsys.readouterr().err
    assert code == 2
    assert err == (  # a name the run would write, and no run of mipo_mlx wrote there
        f"error: {out}: holds {kind}, which no run of mipo_mlx wrote there and this run would "
        "write; move them away or choose another output.dir\n"
    )


def test_wandb_not_logged_in_stops_the_run_in_one_line(inputs, toy_model_dir, tmp_path):
    """No API key, not offline, no terminal to ask on: exit 2, one line, no traceback, and no
    model load (its progress line) nor answers."""
    prompts, _ = inputs
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true")
    out = tmp_path / "out"
    done = train(
        run_args(toy_model_dir, prompts, out, "--training.report_to", "wandb"),
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    [error] = done.stderr.splitlines()  # no model load (its progress line), no traceback
    assert error.startswith("error: training.report_to=wandb: W&B did not start (")
    assert error.endswith(
        "run `wandb login`, or set WANDB_MODE=offline and upload later with `wandb sync`"
    )
    assert not (out / "responses.chosen.jsonl").exists() and not (out / "wandb").exists()


def test_a_tracker_failing_mid_run_is_one_note_and_training_finishes(
    inputs, toy_model_dir, tmp_path, monkeypatch, capsys
):
    """The disk fills while step 2 is logged: one note, no more calls to the tracker, and the
    run ends as usual with every step in metrics.jsonl (TensorBoard has step 1)."""
    prompts, _ = inputs
    real, calls = trackers.TensorBoard._log, []

    def flaky(self, metrics, step):
        calls.append(step)
        if step == 2:
            raise OSError(28, "No space left on device")
        real(self, metrics, step)

    monkeypatch.setattr(trackers.TensorBoard, "_log", flaky)
    out = tmp_path / "out"
    code = main(run_args(toy_model_dir, prompts, out, *ARGS, "--training.report_to", "tensorboard"))
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert calls == [1, 2]
    notes = [line for line in err.splitlines() if "note: training.report_to" in line]
    assert notes == [
        "note: training.report_to=tensorboard stopped logging (OSError: [Errno 28] No space "
        "left on device); training goes on, and metrics.jsonl has every step"
    ]
    assert [r["step"] for r in metrics_rows(out)] == [1, 2, 3, 4, 5, 6]
    events = tensorboard_events(out / "tensorboard")
    assert [e.step for e in events.Scalars("loss")] == [1]
