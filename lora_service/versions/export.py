"""`lora-service export`: a stored version's files, copied out of the state folder (torch-free)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from lora_service.config import Config
from lora_service.errors import ServiceError, UsageError
from lora_service.journal import Journal
from lora_service.journal.events import VersionExported
from lora_service.store import atomic_copy, fsync_dir, fsync_tree, sha256_file
from lora_service.versions.heads import version_files, version_row
from lora_service.versions.publish import ADAPTER_DIR, ADAPTER_WEIGHTS
from lora_service.versions.verify import kohya_file, verify_version_files, version_dir


def export_version(
    journal: Journal,
    config: Config,
    version: str,
    fmt: Literal["kohya", "peft"],
    out: Path,
    force: bool = False,
) -> Path:
    """Write a version's adapter outside the state folder and return the path written.

    `kohya`: the `.safetensors` file (to `out`, or into `out` when it is a folder). `peft`: the
    adapter folder (`adapter_model.safetensors`, `adapter_config.json`, maybe `text_encoder/`)
    as `out`. Atomic either way (temp name + rename); an existing target is refused without
    `force` (UsageError). The files are verified against the journal first (ServiceError naming
    the file). Journaled as `VersionExported(kind="export")`."""
    row = version_row(journal, version)
    files = version_files(row)
    state = config.paths.state
    problems = verify_version_files(state, files)
    if problems:
        raise ServiceError(f"{version}: files fail verification: {'; '.join(problems)}")
    out = Path(out)
    if fmt == "kohya":
        src = state / kohya_file(version, files)
        target = out / src.name if out.is_dir() else out
        if target.exists() and not force:
            raise UsageError(f"{target}: exists; pass --force to overwrite")
        if not target.parent.is_dir():
            raise UsageError(f"{target.parent}: no such folder")
        sha = atomic_copy(src, target)
    elif fmt == "peft":
        target = out
        if target.exists() and not force:
            raise UsageError(f"{target}: exists; pass --force to overwrite")
        if not target.parent.is_dir():
            raise UsageError(f"{target.parent}: no such folder")
        _replace_tree(state / version_dir(version) / ADAPTER_DIR, target)
        sha = sha256_file(target / ADAPTER_WEIGHTS)
    else:
        raise UsageError(f"--format: {fmt!r} is not one of kohya, peft")
    journal.append(
        VersionExported(
            version=version, path=str(target.resolve()), sha256=sha, kind="export", format=fmt
        )
    )
    return target


def _replace_tree(src: Path, dst: Path) -> None:
    """Copy folder `src` to `dst` so that `dst` is the old one or the complete new one."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    fsync_tree(tmp)
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)  # a folder cannot be renamed over a non-empty folder
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()
