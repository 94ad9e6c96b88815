"""Checks of a version's files against the hashes its `VersionCreated` journaled. No torch.

A version folder (`state/versions/vNNNN/`) holds `adapter/` (peft layout), one kohya file
`<name>-vNNNN.safetensors` and `card.json`; the event's `files` maps each one's path relative
to the state folder to its sha256. Moving the head to a version, deploying or exporting it
first checks every one of them, so a tampered or truncated file never reaches a user.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from lora_service.errors import ServiceError
from lora_service.store import sha256_file


def verify_version_files(state_dir: Path, files: dict[str, str]) -> list[str]:
    """One line per problem ('<path>: missing' / '<path>: sha256 … != journaled …'), sorted."""
    problems = []
    for rel, expected in sorted(files.items()):
        path = Path(state_dir) / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        actual = sha256_file(path)
        if actual != expected:
            problems.append(f"{rel}: sha256 {actual[:16]}… != journaled {expected[:16]}…")
    return problems


def version_dir(version: str) -> str:
    """The version's folder, relative to the state folder."""
    return f"versions/{version}"


def kohya_file(version: str, files: dict[str, str]) -> str:
    """The state-relative path of a version's kohya/WebUI file (the one `.safetensors` at the
    top of its folder; looked up, not rebuilt, since `name` in the config may change)."""
    folder = version_dir(version)
    found = [
        rel for rel in files if posixpath.dirname(rel) == folder and rel.endswith(".safetensors")
    ]
    if len(found) != 1:
        raise ServiceError(f"{version}: expected one kohya file in {folder}/, found {found}")
    return found[0]
