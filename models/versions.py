"""Writing a new version folder into a model repository: whole or not at all.

A checkpoint is written into a hidden staging folder beside its final place and renamed into
place at the end, so a server scanning the repository never sees a half-written version, and an
existing version is never overwritten. Used by `rnnserve train` and `rnnserve import-torch`.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def staging_folder(model_dir: Path, version: int) -> Path:
    """A fresh hidden folder beside the final one, to write the checkpoint into."""
    # NOTE: not tempfile.mkdtemp: its 0700 mode would keep a server running as another user out.
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".{version}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def publish_version(staging: Path, model_dir: Path, version: int) -> Path:
    """Move a finished staging folder to `model_dir/version`.

    Raises FileExistsError (and removes the staging folder) when that version exists."""
    final = model_dir / str(version)
    _default_modes(staging)
    try:
        if final.exists():
            raise FileExistsError(final)
        # NOTE: rename(2) fails on a non-empty target, so a version written meanwhile by
        # someone else is never replaced.
        staging.rename(final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(final) from exc
    return final


def discard(staging: Path) -> None:
    """Remove an unfinished staging folder."""
    shutil.rmtree(staging, ignore_errors=True)


def _default_modes(folder: Path) -> None:
    """Give every file the mode a plain `open` would (safetensors writes 0600, which would keep
    a server running as another user out of a published version)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
