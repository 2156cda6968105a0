"""Publishing to the Hugging Face Hub: a fused model folder, or the pairs as a dataset.

The token comes from the environment (HF_TOKEN) or the cached `hf auth login`;
it is passed to the client and never printed, logged or written to a file.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import UserError
from ..core.progress import Progress

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_api():
    """The Hub client (a seam: tests put a stand-in here; nothing else reaches the network)."""
    from huggingface_hub import HfApi

    return HfApi()


def require_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was uploaded"
        )
    return token


def files_of(path: Path) -> list[tuple[str, int]]:
    """(name relative to the upload root, size in bytes) for each file that would be sent;
    hidden files (export's marker) are not sent."""
    if path.is_file():
        return [(path.name, path.stat().st_size)]
    return [
        (str(p.relative_to(path)), p.stat().st_size)
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    ]


def check_repo_id(repo_id: str, flag: str = "--upload-repo") -> None:
    if not REPO_ID.match(repo_id):
        raise UserError(f"{flag} {repo_id!r}: use the form user/name")


def hub_failure(err: BaseException, repo_id: str, token: str) -> str:
    """One line for a failed upload: what went wrong, never the token."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    text = " ".join(str(err).split()) or type(err).__name__
    text = text.replace(token, "<token>") if token else text
    if len(text) > 160:
        text = text[:157] + "..."
    if status in (401, 403):
        what = f"the Hub refused the token for {repo_id} (HTTP {status}); check its write access"
    elif status is not None:
        what = f"the Hub answered HTTP {status} for {repo_id}: {text}"
    else:
        what = f"could not reach the Hub: {text}"
    return f"{what}; the files are kept, publish again with the same command"


def publish(
    path: Path, repo_id: str, *, private: bool, dry_run: bool, kind: str = "model"
) -> list[str]:
    """Create the repo (if needed) and upload `path` (a folder, or one file); return the names
    sent."""
    check_repo_id(repo_id)
    files = files_of(Path(path))
    visibility = "private" if private else "public"
    print(f"{'would upload' if dry_run else 'uploading'} to {kind} repo {repo_id} ({visibility}):")
    for name, size in files:
        print(f"  {name}  ({size:,} bytes)")
    if dry_run:
        print("dry run: nothing was sent")
        return [name for name, _ in files]
    token = require_token()
    api = hub_api()
    total = sum(size for _, size in files)
    try:
        with Progress(1, f"upload {total / 2**20:.1f} MiB to {repo_id}"):
            api.create_repo(
                repo_id=repo_id, repo_type=kind, private=private, exist_ok=True, token=token
            )
            if Path(path).is_file():
                api.upload_file(
                    path_or_fileobj=str(path),
                    path_in_repo=Path(path).name,
                    repo_id=repo_id,
                    repo_type=kind,
                    token=token,
                )
            else:
                api.upload_folder(
                    folder_path=str(path),
                    repo_id=repo_id,
                    repo_type=kind,
                    token=token,
                    allow_patterns=[name for name, _ in files],
                )
    except (TypeError, AttributeError, NameError):
        raise  # a bug here, not the network
    except Exception as err:  # the client's network, HTTP and auth errors, in any version
        raise UserError(hub_failure(err, repo_id, token)) from None
    print(f"published https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}")
    return [name for name, _ in files]
