"""Where a training run writes: the next numbered version of a model in a repository.

A version folder appears whole or not at all: the checkpoint is written into a hidden temporary
folder beside it and renamed into place at the end, so a server scanning the repository never
sees a half-written version, and an existing version is never overwritten.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path

from models.training.errors import TrainingError
from models.versions import publish_version

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def check_name(name: str) -> str:
    """A model name: letters, digits, '-', '_', '.'; not '.' or '..' (DESIGN §2)."""
    if not NAME.fullmatch(name) or set(name) == {"."}:
        raise TrainingError(
            f"--name {name!r} is not a valid model name "
            "(letters, digits, '-', '_', '.'; at most 128; not '.' or '..')"
        )
    return name


def existing_versions(model_dir: Path) -> list[int]:
    """The numbered version folders of a model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def reserve(repository: Path, name: str, version: int | None) -> tuple[Path, int]:
    """Check that `repository/name` is writable and pick the version (next free one when None).

    Fails early, before any training, with a one-line `TrainingError`.
    """
    if repository.exists() and not repository.is_dir():
        raise TrainingError(f"--out {repository} exists and is not a folder")
    model_dir = repository / check_name(name)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=model_dir, prefix=".write-test-", delete=True)  # noqa: SIM115
        probe.close()
    except OSError as exc:
        raise TrainingError(
            f"--out {repository}: cannot write there ({exc.strerror or exc})"
        ) from exc
    versions = existing_versions(model_dir)
    if version is None:
        return model_dir, (versions[-1] + 1 if versions else 1)
    if version < 1:
        raise TrainingError(f"--version must be ≥ 1, got {version}")
    if version in versions or (model_dir / str(version)).exists():
        raise TrainingError(
            f"version {version} of {name!r} already exists in {repository}; "
            "versions are never overwritten (leave out --version to write the next one)"
        )
    return model_dir, version


def publish(staging: Path, model_dir: Path, version: int) -> Path:
    """Move the finished staging folder to `model_dir/version`; refuse if that now exists."""
    try:
        return publish_version(staging, model_dir, version)
    except FileExistsError as exc:
        raise TrainingError(
            f"version {version} appeared in {model_dir} while training; nothing was overwritten"
        ) from exc


def remove_if_empty(model_dir: Path) -> None:
    """Remove a model folder that a failed run created and left without any version."""
    # NOTE: rmdir fails on a folder that holds anything (other versions): that one stays.
    with contextlib.suppress(OSError):
        model_dir.rmdir()


def folder_bytes(folder: Path) -> int:
    """Total size of the files in `folder`."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
