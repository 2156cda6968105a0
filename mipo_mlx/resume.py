"""Interrupted runs: stop requests, partial generation files, and checks before resuming.

Generation appends each finished response to `responses.<pass>.jsonl` (one line, one
write); a rerun keeps those and generates only the rest. Because each prompt samples
from its own seeded stream, the resumed responses are the uninterrupted ones.
"""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import yaml

from .config import Config, to_dict
from .errors import UserError
from .files import append_jsonl, write_text
from .generate import Response

# Settings that may differ between an interrupted run and its resumption.
MAY_CHANGE = {"output.overwrite", "training.memory_limit_gb", "evaluation.plots"}


class StopFlag:
    """Set by the first SIGINT/SIGTERM; work stops at the next safe point. A second signal interrupts."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    @contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
                  "(send again to stop at once)", flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def read_lines(path: Path) -> list[dict]:
    """Whole JSON lines of a file being appended to; a torn last line (a kill mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number < len(lines) - 1:  # only the last line may be torn
                raise UserError(f"{path}:{number}: corrupt line; delete the file to redo this stage") from None
    return rows


def cached_responses(path: Path, count: int) -> dict[int, Response]:
    done = {}
    for row in read_lines(path):
        if 0 <= row["index"] < count:
            done[row["index"]] = Response(row["token_ids"], row["finished"])
    return done


def record_response(path: Path, index: int, response: Response) -> None:
    append_jsonl(path, {"index": index, "token_ids": response.token_ids, "finished": response.finished})


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the metric lines up to the checkpoint's step (later ones will be logged again)."""
    rows = [r for r in read_lines(path) if r.get("step", 0) <= last_step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _flat(data: dict) -> dict:
    return {f"{s}.{k}": v for s, body in data.items() for k, v in body.items()}


def check_same_run(out: Path, config: Config) -> None:
    """Resuming into `out` needs the settings it was started with (a few may change)."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"{out}: no config.yaml, so no run to resume; start it without --resume")
    saved = _flat(yaml.safe_load(saved_path.read_text()) or {})
    now = _flat(to_dict(config))
    for key in sorted(now):
        if key not in MAY_CHANGE and saved.get(key) != now[key]:
            raise UserError(f"{out}: belongs to another run ({key} was {saved.get(key)!r}, now {now[key]!r}); "
                            "resume with the same settings or choose another output.dir")
