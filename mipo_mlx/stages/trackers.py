"""Experiment trackers (`training.report_to`): the run's metrics, settings, evaluation table
and plots also go to TensorBoard or Weights & Biases; metrics.jsonl stays the record.

`start` runs before the first slow stage, so a tracker that cannot start (its library
missing, W&B not logged in) stops the run in one line; TensorBoard writes nothing until the
run's own checks have passed. Once started, a tracker never stops training: a failure while
logging is one note, and the run goes on without it. Only rank 0 reports; the other ranks
get the null tracker. A resumed run goes on in the same TensorBoard folder and W&B run.
"""

from __future__ import annotations

import importlib
import os
import struct
import time
from pathlib import Path

import yaml

from ..core import reading
from ..core.config import Config
from ..core.errors import UserError
from ..core.files import write_json
from ..engine import distributed as dist

TENSORBOARD_DIR = "tensorboard"
WANDB_RUN = "wandb_run.json"  # the W&B run's id and project: --resume continues that run


class Tracker:
    """The null tracker (report_to: none, and every rank but 0). A backend is a subclass
    registered by its `name` (the training.report_to value; core.config.REPORT_TO lists the
    names): it says which `library` it imports and which `files` it writes at the top of the
    run folder (the first, a folder), starts in `open`, and overrides the underscored
    methods; the public ones turn its first failure into one note."""

    name = "none"
    library = ""
    files: tuple[str, ...] = ()
    on = True

    @classmethod
    def open(cls, library, config: Config, folder: Path, resume: bool) -> Tracker:
        """The started tracker; raise UserError when it cannot start."""
        raise NotImplementedError

    def log(self, metrics: dict, step: int) -> None:
        """The numbers of one metrics.jsonl row, under the row's own names."""
        self._safely(self._log, {k: v for k, v in metrics.items() if k != "step"}, step)

    def log_config(self, config: dict) -> None:
        self._safely(self._log_config, config)

    def log_table(self, name: str, markdown: str, step: int) -> None:
        self._safely(self._log_table, name, markdown, step)

    def log_image(self, name: str, png: Path, step: int) -> None:
        if png.is_file():  # plots are optional (evaluation.plots, matplotlib)
            self._safely(self._log_image, name, png, step)

    def finish(self, ok: bool = True) -> None:
        self._safely(self._finish, ok)
        self.on = False

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, error_type, *_) -> None:
        self.finish(ok=error_type is None)

    def _safely(self, call, *args) -> None:
        if not self.on:
            return
        try:
            call(*args)
        except Exception as err:  # a copy of metrics.jsonl failing (network, disk) ends no run
            self.on = False
            dist.say(
                f"note: training.report_to={self.name} stopped logging ({type(err).__name__}: "
                f"{_first_line(err)}); training goes on, and metrics.jsonl has every step"
            )

    def _log(self, metrics: dict[str, float], step: int) -> None: ...
    def _log_config(self, config: dict) -> None: ...
    def _log_table(self, name: str, markdown: str, step: int) -> None: ...
    def _log_image(self, name: str, png: Path, step: int) -> None: ...
    def _finish(self, ok: bool) -> None: ...


TRACKERS: dict[str, type[Tracker]] = {}


def register(cls: type[Tracker]) -> type[Tracker]:
    TRACKERS[cls.name] = cls
    return cls


@register
class TensorBoard(Tracker):
    """Event files in <output>/tensorboard, one per attempt, each event written through at
    once (tensorboardX's SummaryWriter queues them: a killed run would lose the last). An
    attempt's file starts with a restart marker, so TensorBoard shows it in place of the
    earlier ones: a resumed run sends metrics.jsonl's rows up to its checkpoint again."""

    name = "tensorboard"
    library = "tensorboardX"
    files = (TENSORBOARD_DIR,)

    @classmethod
    def open(cls, library, config: Config, folder: Path, resume: bool) -> Tracker:
        return cls(library, folder / TENSORBOARD_DIR, resume)

    def __init__(self, tensorboardx, logdir: Path, resume: bool):
        self.tbx, self.logdir, self.resume, self.file = tensorboardx, logdir, resume, None
        self.Summary = tensorboardx.proto.summary_pb2.Summary

    def write(self, step: int, **event) -> None:
        Event = self.tbx.proto.event_pb2.Event
        if self.file is None:  # opened at first use: after the run's own checks passed
            self.logdir.mkdir(parents=True, exist_ok=True)
            writer = self.tbx.event_file_writer.EventsWriter
            self.file = writer(str(self.logdir / "events"), f".{os.getpid()}")
            restart = self.tbx.proto.event_pb2.SessionLog.START
            self.file.write_event(Event(step=0, session_log={"status": restart}))
        self.file.write_event(Event(step=step, wall_time=time.time(), **event))
        self.file.flush()

    def _log(self, metrics: dict[str, float], step: int) -> None:
        values = [self.Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        self.write(step, summary=self.Summary(value=values))

    def _log_config(self, config: dict) -> None:
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        code = "".join(f"    {line}\n" for line in text.splitlines())  # a markdown code block
        self.write(0, summary=self.tbx.summary.text("config", code))

    def _log_table(self, name: str, markdown: str, step: int) -> None:
        self.write(step, summary=self.tbx.summary.text(name, markdown))

    def _log_image(self, name: str, png: Path, step: int) -> None:
        data = png.read_bytes()
        width, height = struct.unpack(">II", data[16:24])  # the PNG header's IHDR chunk
        image = self.Summary.Image(height=height, width=width, encoded_image_string=data)
        self.write(step, summary=self.Summary(value=[self.Summary.Value(tag=name, image=image)]))

    def _finish(self, ok: bool) -> None:
        if self.file is not None:
            self.file.close()


@register
class WandB(Tracker):
    name = "wandb"
    library = "wandb"
    files = ("wandb", WANDB_RUN)

    @classmethod
    def open(cls, library, config: Config, folder: Path, resume: bool) -> Tracker:
        return _wandb(library, config, folder, resume)

    def __init__(self, wandb, run):
        self.wandb, self.run = wandb, run

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if step >= self.run.step:  # W&B keeps steps increasing: a resumed run keeps what it has
            self.run.log(metrics, step=step)

    def _log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def _log_table(self, name: str, markdown: str, step: int) -> None:
        rows = [  # cells stay text, as in eval.md: a PMI cell holds its interval too
            [cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in markdown.splitlines()
            if line.startswith("|") and not line.startswith("| ---")
        ]
        table = self.wandb.Table(columns=rows[0], data=rows[1:])
        self.run.log({name: table}, step=max(step, self.run.step))

    def _log_image(self, name: str, png: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(png))}, step=max(step, self.run.step))

    def _finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0]


def start(config: Config, folder: Path, resume: bool) -> Tracker:
    """The tracker `training.report_to` names, started; the null tracker for none and on every
    rank but 0. Raises a UserError when it cannot start."""
    kind = config.training.report_to
    if kind == "none" or not dist.is_main():
        return Tracker()
    backend = TRACKERS[kind]
    try:
        library = importlib.import_module(backend.library)
    except Exception as err:  # not installed, or built for other versions (protobuf's, say)
        raise UserError(
            f"training.report_to={kind} needs {backend.library}, which did not import "
            f"({_first_line(err)}): pip install -U 'mipo_mlx[{kind}]', or set "
            "training.report_to: none"
        ) from None
    files = folder / backend.files[0]
    if files.exists() and not files.is_dir():  # W&B would quietly write to a temporary folder
        raise UserError(
            f"training.report_to={kind}: {files} is not a folder; move it away or choose "
            "another output.dir"
        )
    return backend.open(library, config, folder, resume)


def tracker_files(kind: str) -> tuple[str, ...]:
    """What the tracker `kind` writes at the top of the run folder (recorded, so that an
    overwrite clears it); none for report_to: none."""
    return TRACKERS[kind].files if kind in TRACKERS else ()


def _wandb(wandb, config: Config, folder: Path, resume: bool) -> Tracker:
    saved = folder / WANDB_RUN
    earlier = reading.read_json_or_none(saved, "W&B run") if resume and saved.is_file() else {}
    if not isinstance(earlier, dict):
        raise UserError(f"{saved}: damaged; delete it, and the run goes on in a new W&B run")
    try:
        run = wandb.init(
            project=earlier.get("project") or os.environ.get("WANDB_PROJECT", "mipo_mlx"),
            entity=earlier.get("entity"),
            name=config.training.run_name or folder.resolve().name,
            id=earlier.get("id"),
            resume="allow" if earlier else None,
            dir=str(folder),  # W&B's files go to <output>/wandb, not the working directory
        )
    except (wandb.errors.Error, TimeoutError) as err:
        raise UserError(
            f"training.report_to=wandb: W&B did not start ({_first_line(err)}); run `wandb "
            "login`, or set WANDB_MODE=offline and upload later with `wandb sync`"
        ) from None
    write_json(saved, {"id": run.id, "project": run.project, "entity": run.entity or None})
    return WandB(wandb, run)
