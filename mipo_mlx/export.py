"""`python -m mipo_mlx.export`: fuse the adapters, prove the fused model is the trained one,
publish.

  python -m mipo_mlx.export --adapters <run-dir> --output <dir> [--quantize {4,8}]
                            [--gguf {f32,f16,q8_0}] [--upload-repo user/name] [--private]
                            [--dry-run] [--force] [--overwrite]

The fused model is de-quantized by default: W = dequantize(W_q) + scale * B^T A^T,
in the base's float dtype, so nothing the adapters learned is rounded away (a
re-quantized fuse can erase small DPO updates). Before anything is written as
final or uploaded, the fused model is checked against base + adapters on the
run's held-out pairs: logits within a tolerance, and chosen-minus-rejected
log-prob margins preserved.

`--gguf TYPE` also writes the fused model as one GGUF file (llama.cpp, Ollama, LM Studio)
with an Ollama Modelfile, and checks the file in llama.cpp itself where llama-cpp-python is
installed: its logits against the fused model's on the same pairs, and its tokenizer against
the Hugging Face one. Without llama-cpp-python the file is kept and marked not verified.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from .core import reading
from .core.errors import UserError, handling, reports_user_errors
from .core.files import atomic_folder, check_output_place, folder_lock
from .publish.card import model_card
from .publish.gguf_file import FILE_TYPES, check_base
from .publish.hub import check_repo_id, publish, require_token

MARKER = ".mipo_mlx_export"  # in every folder export writes; --overwrite replaces only those


def base_model(run: Path) -> str | None:
    """The run's model.path as its config.yaml says (None where it cannot say: the fuse
    reports a damaged config.yaml in its own words)."""
    try:
        path = reading.parse_yaml(reading.read_text(run / "config.yaml", "config"), "")
        path = path["model"]["path"]
    except (UserError, TypeError, KeyError):
        return None
    return path if isinstance(path, str) else None


def check_export_place(out: Path, given: str, run: Path) -> None:
    """Export writes where nothing else lives: not the working directory, the base model's
    folder or the run's, nor a folder holding or inside one of them. A symbolic link is refused
    rather than followed: the folder is replaced by renames, which would replace the link."""
    check_output_place(out, given, "--output", base_model(run))
    if out.is_symlink():
        raise UserError(
            f"--output {given}: is a symbolic link (to {os.readlink(out)}); give the folder "
            "it points to, or another --output"
        )
    target, adapters = out.resolve(), run.resolve()
    if target == adapters or target in adapters.parents or adapters in target.parents:
        where = (
            "is the adapters folder"
            if target == adapters
            else "holds the adapters folder"
            if target in adapters.parents
            else "is inside the adapters folder"
        )
        raise UserError(f"--output {out}: {where}; choose a folder outside {run}")


def check_export_folder(out: Path, overwrite: bool) -> None:
    """Export replaces nothing it did not write: with --overwrite only a folder an earlier
    export wrote."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --output")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"{out}: exists and is not empty; choose another --output or pass --overwrite"
            )
        if not (out / MARKER).is_file():
            raise UserError(
                f"{out}: not a folder mipo_mlx.export wrote, and --overwrite replaces only "
                "those; choose an empty or new --output"
            )


class Interrupted(BaseException):
    """The first SIGINT/SIGTERM during export (a BaseException: no `except Exception` on the
    way out may take it for a failure of its own)."""


@contextmanager
def stops_at_once():
    """The first SIGINT or SIGTERM raises `Interrupted` wherever export is (a fuse has no step
    worth finishing); later ones are ignored, so that removing the partial folder completes."""
    seen: list[int] = []

    def handler(signum, frame):
        if not seen:
            seen.append(signum)
            raise Interrupted(signal.Signals(signum).name)

    with handling(handler):  # the main thread's alone: no handlers in any other
        yield


class _Parser(argparse.ArgumentParser):
    """Mistakes on the command line are one-line user errors (exit 2), as in train."""

    def error(self, message: str):
        raise UserError(f"command line: {message}; see --help")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m mipo_mlx.export",
        usage=(
            "%(prog)s --adapters RUN_DIR --output DIR [--quantize {4,8}] "
            "[--gguf {f32,f16,q8_0}] [--upload-repo ...]"
        ),
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    p.add_argument(
        "--adapters", required=True, metavar="RUN_DIR", help="folder written by mipo_mlx.train"
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the fused model")
    p.add_argument(
        "--quantize",
        type=int,
        choices=(4, 8),
        help="re-quantize the fused model (reports the drift)",
    )
    p.add_argument(
        "--gguf",
        choices=FILE_TYPES,
        help="also write one GGUF file of the fused model (llama.cpp, Ollama, LM Studio)",
    )
    p.add_argument(
        "--upload-repo", metavar="USER/NAME", help="publish to this Hugging Face Hub repo"
    )
    p.add_argument(
        "--upload-pairs-repo",
        metavar="USER/NAME",
        help="also publish pairs.jsonl as a dataset repo",
    )
    p.add_argument("--private", action="store_true", help="make the uploaded repos private")
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be uploaded; send nothing"
    )
    p.add_argument(
        "--force", action="store_true", help="write even if the fused model fails the check"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a folder an earlier export wrote"
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the base model's files run code (never taken from the run's config.yaml)",
    )
    return p


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run, out = Path(args.adapters), Path(args.output)
    pairs_repo = args.upload_pairs_repo
    from .core.backend import require_mlx

    if not run.is_dir():
        raise UserError(f"{run}: not found; --adapters must be a folder written by mipo_mlx.train")
    check_export_place(out, args.output, run)
    check_export_folder(out, args.overwrite)
    for flag, repo in (("--upload-repo", args.upload_repo), ("--upload-pairs-repo", pairs_repo)):
        if repo:
            check_repo_id(repo, flag)
    if pairs_repo and not (run / "pairs.jsonl").is_file():
        raise UserError(f"{run}: no pairs.jsonl to publish with --upload-pairs-repo")
    if (args.upload_repo or pairs_repo) and not args.dry_run:
        require_token()  # fail before the slow part, not after
    if args.gguf:
        if importlib.util.find_spec("gguf") is None:
            raise UserError("--gguf needs the gguf package: pip install 'mipo_mlx[gguf]'")
        check_base(run)  # architecture and tokenizer, before the slow part
    # The checks compare float32 logits at 1e-3: keep matmuls at full float32 where MLX would
    # use TF32 (NVIDIA GPUs, Apple M5), unless the user chose otherwise
    os.environ.setdefault("MLX_ENABLE_TF32", "0")
    require_mlx()
    try:
        with folder_lock(out, "--output", replaced=True), stops_at_once():
            check_export_folder(out, args.overwrite)  # again: another export may just have ended
            write_export(run, out, args)
    except Interrupted as stop:
        print(f"{stop}: export stopped; nothing was written to {out}", file=sys.stderr)
        return 130
    files = sorted(p for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({len(files)} files); load it with mlx_lm.load('{out}')")
    if args.upload_repo:
        publish(out, args.upload_repo, private=args.private, dry_run=args.dry_run, kind="model")
    if args.upload_pairs_repo:
        publish(
            run / "pairs.jsonl",
            args.upload_pairs_repo,
            private=args.private,
            dry_run=args.dry_run,
            kind="dataset",
        )
    return 0


def write_export(run: Path, out: Path, args: argparse.Namespace) -> None:
    """Fuse and check, then write the folder whole or not at all (a failure or a stop leaves
    an earlier output as it was, and no partial folder)."""
    from .publish import gguf_file
    from .publish.fuse import build, requantize, save_folder

    fused = build(run, args.force, args.trust_remote_code)
    with atomic_folder(out) as folder:
        gguf = gguf_file.export(folder, fused, args.gguf, args.force) if args.gguf else None
        drift = requantize(fused, args.quantize) if args.quantize else None
        card = model_card(
            run, fused.config, fused.model_config, fused.check, drift, args.quantize, gguf
        )
        save_folder(folder, fused.model, fused.tokenizer, fused.model_config, card)
        (folder / MARKER).write_text(f"fused from {run.resolve()}\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
