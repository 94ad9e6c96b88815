"""`state/daemon.json`: what the running daemon knows that is not a journal fact.

The next scheduled fire time and the heartbeat change every few seconds; journaling them would
flood the audit log, so the daemon rewrites this small file atomically instead and `status`
reads it only while the daemon holds the lock.

On a full disk the atomic rewrite (a new temporary file) is refused; `overwrite_status` then
writes over the existing file's bytes, which needs no new block on the usual file systems, so
`status` can still say what is wrong. A reader may catch that write half-done: it reads again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lora_service.store import atomic_write_bytes

READ_TRIES = 5


def status_path(state_dir: Path) -> Path:
    return state_dir / "daemon.json"


def write_status(state_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_bytes(status_path(state_dir), json.dumps(info, sort_keys=True).encode())


def overwrite_status(state_dir: Path, info: dict[str, Any]) -> bool:
    """Write `info` over the existing file in place (best effort; False when refused too).

    Padded with spaces to the old length, so no stale tail is left behind."""
    data = json.dumps(info, sort_keys=True).encode()
    try:
        fd = os.open(status_path(state_dir), os.O_WRONLY)
    except OSError:
        return False
    try:
        os.pwrite(fd, data.ljust(os.fstat(fd).st_size), 0)  # JSON ignores trailing spaces
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def read_status(state_dir: Path) -> dict[str, Any]:
    for _ in range(READ_TRIES):
        try:
            return json.loads(status_path(state_dir).read_text())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            time.sleep(0.01)  # caught half-way through an in-place overwrite
    return {}
