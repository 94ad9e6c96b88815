"""What killed processes leave in the state folder, removed when the daemon starts.

Every file the journal points at is written under a temporary name and renamed (`store`), so a
process killed half-way leaves only such temporaries: never referenced, safe to delete, but
they hold disk space until someone does. The daemon removes them at start, holding the state
lock (no other daemon, no training child of ours is running). A name that carries its writer's
pid (`.tmp-<pid>`) is kept while that process lives: a CLI command may be writing it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

PATTERNS = (
    ".daemon.json.*.tmp",  # the status file (store.atomic_writer)
    "versions/.v*.tmp-*",  # a version being published (versions.publish)
    "base/.*.tmp-*",  # a builtin base model being built (models.base_model)
    "runs/*/checkpoints/.step-*.tmp-*",  # a checkpoint being written (training.checkpoint)
    "cache/*/.*.tmp",  # a latent or text embedding being cached (training.data)
)
_PID = re.compile(r"\.tmp-(\d+)$")


def _writer_alive(path: Path) -> bool:
    match = _PID.search(path.name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def remove_leftovers(state_dir: Path) -> list[Path]:
    """Remove the temporaries of killed writers under `state_dir`; return what was removed."""
    removed = []
    for pattern in PATTERNS:
        for path in sorted(state_dir.glob(pattern)):
            if _writer_alive(path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
