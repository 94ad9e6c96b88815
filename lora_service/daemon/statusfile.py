"""`state/daemon.json`: what the running daemon knows that is not a journal fact.

The next scheduled fire time and the heartbeat change every few seconds; journaling them would
flood the audit log, so the daemon rewrites this small file atomically instead and `status`
reads it only while the daemon holds the lock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_service.store import atomic_write_bytes


def status_path(state_dir: Path) -> Path:
    return state_dir / "daemon.json"


def write_status(state_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_bytes(status_path(state_dir), json.dumps(info, sort_keys=True).encode())


def read_status(state_dir: Path) -> dict[str, Any]:
    try:
        return json.loads(status_path(state_dir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
