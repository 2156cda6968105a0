"""The run record (`run.json`): what defines a run, written when it starts, read by every resume.

config.yaml is the user's to read and edit; the record is what a resume is held to:
  settings     every setting that changes what the run computes (all but `MAY_CHANGE`)
  model        the base model's identity: hashes of its config.json and of each weight file
               (size, header and evenly spaced samples: cheap, and no two trained models
               share them)
  evaluation   the evaluation settings and held-out prompts the cached evaluation results
               were made with (they may change; the results are then made again)
The data the run was made from is fingerprinted in inputs.json, the pairs in the checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..core import reading
from ..core.errors import UserError

RECORD = "run.json"
# Settings that may differ between an interrupted run and its resumption, as they change
# nothing the run trains: where the folder is now (moved, copied, or named from another
# working directory) and how a new run would treat it; where the metrics also go and what
# memory MLX may take; when validation, adapter copies and checkpoints are written (a resumed
# run equals an uninterrupted one whatever the step it resumed from); and the evaluation
# stage, made again from the base when it changed (`evaluation_changed`). With guard.prompts
# set, the guard ranks the rounds by evaluation.*, so that section is then fixed.
MAY_CHANGE = (
    "output.dir",
    "output.overwrite",
    "model.trust_remote_code",  # given on each command line, never read back from the run
    "training.report_to",
    "training.run_name",
    "training.memory_limit_gb",
    "training.valid_every",
    "training.save_every",
    "training.checkpoint_every",
    "evaluation.*",
)
GUARD_READS = "evaluation."
SAMPLES = 16  # evenly spaced chunks of a weight file, besides its header
CHUNK = 4096


def may_change(key: str, settings: dict) -> bool:
    """Whether `key` may differ from the record, for a run with `settings` (flat, dotted)."""
    if key.startswith(GUARD_READS) and settings.get("guard.prompts"):
        return key == "evaluation.plots"
    return key in MAY_CHANGE or any(p.endswith(".*") and key.startswith(p[:-1]) for p in MAY_CHANGE)


def file_fingerprint(path: Path) -> str:
    """A hash of a weight file's size, safetensors header and SAMPLES chunks spread over its
    data: a few hundred KB read, however large the file."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        head = fh.read(8)
        digest.update(head)
        if len(head) == 8:
            digest.update(fh.read(min(int.from_bytes(head, "little"), size)))
        for k in range(SAMPLES):
            fh.seek(size * k // SAMPLES)
            digest.update(fh.read(CHUNK))
        fh.seek(max(size - CHUNK, 0))
        digest.update(fh.read(CHUNK))
    return digest.hexdigest()[:16]


def model_folder(path: str, revision: str | None) -> Path | None:
    """The local folder of model.path: the folder itself, or a Hub id's cached snapshot
    (None when it is not in the cache: nothing is downloaded here)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        found = snapshot_download(
            path,
            revision=revision,
            local_files_only=True,
            allow_patterns=["config.json", "*.safetensors"],
        )
    except Exception:  # not cached, or no such repo: the identity is unknown, not wrong
        return None
    return Path(found)


def model_identity(path: str, revision: str | None) -> dict[str, str] | None:
    """{file name: fingerprint} of the model's config.json and weight files, or None."""
    folder = model_folder(path, revision)
    if folder is None or not (folder / "config.json").is_file():
        return None
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    try:
        return {f.name: file_fingerprint(f) for f in files}
    except OSError:
        return None


def make(settings: dict, evaluation: dict) -> dict:
    """The record of a run with `settings` (flat, dotted, local paths absolute)."""
    return {
        "settings": {k: v for k, v in settings.items() if not may_change(k, settings)},
        "model": model_identity(settings["model.path"], settings.get("model.revision")),
        "evaluation": evaluation,
    }


def read(path: Path) -> dict | None:
    """The record at `path`, or None when the run was started before runs kept one."""
    if not path.is_file():
        return None
    record = reading.read_json_or_none(path, "run record")
    if not (isinstance(record, dict) and isinstance(record.get("settings"), dict)):
        raise UserError(
            f"{path}: damaged, so this run cannot be resumed; start it again in a new output.dir"
        )
    return record


def changed_model(saved: dict | None, now: dict | None) -> str | None:
    """The first model file whose fingerprint differs (None: same model, or unknown)."""
    if saved is None or now is None:
        return None
    return next(
        (name for name in sorted(set(saved) | set(now)) if saved.get(name) != now.get(name)), None
    )


def check(out: Path, record: dict, settings: dict) -> None:
    """Refuse resuming the run of `record` with `settings` (flat, dotted) in one line: a
    setting that may not change, or another model at model.path."""
    now = model_identity(settings["model.path"], settings.get("model.revision"))
    differs = changed_model(record.get("model"), now)
    if differs is not None:
        raise UserError(
            f"{out}: the model at model.path changed since the run started ({differs} differs); "
            "point model.path at the model it started with, or start a new run in another "
            "output.dir"
        )
    known = record.get("model") is not None and now is not None
    saved = record["settings"]
    for key in sorted(saved):  # a setting added since the run started keeps its old behaviour
        if may_change(key, settings) or (key == "model.path" and known):
            continue
        if saved[key] != settings.get(key):
            raise UserError(
                f"{out}: belongs to another run ({key} was {saved[key]!r} when it started, now "
                f"{settings.get(key)!r}); resume with the settings it started with (only "
                f"{', '.join(MAY_CHANGE)} may change), or choose another output.dir"
            )
