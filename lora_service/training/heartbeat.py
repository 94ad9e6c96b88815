"""The training child's heartbeat: the mtime of a file the daemon names (`--heartbeat PATH`).

The daemon stops a child whose heartbeat has not moved for `train.stall_timeout`. `beat()` is
called where work visibly progresses: after every training step and for every image encoded or
validated. Phases that cannot beat from inside (loading the base model, publishing, rendering
samples) run under `phase()`, where a thread beats for them: a hang there is not detected, but
a long legitimate phase is never taken for one. Touching a file costs one `utime` a second at
most, needs no free space, and a killed child leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

EVERY_S = 1.0

_path: Path | None = None
_last = 0.0


def use(path: Path | None) -> None:
    """Beat on `path` from now on (None: no daemon is watching, beats do nothing)."""
    global _path, _last
    _path, _last = path, 0.0
    beat()


def beat() -> None:
    global _last
    now = time.monotonic()
    if _path is None or now - _last < EVERY_S:
        return
    _last = now
    with contextlib.suppress(OSError):  # a missing file must not fail the run
        os.utime(_path)


@contextlib.contextmanager
def phase() -> Iterator[None]:
    """Beat from a thread while the block runs (a step that cannot beat by itself)."""
    if _path is None:
        yield
        return
    done = threading.Event()

    def keep_beating() -> None:
        while not done.wait(EVERY_S):
            beat()

    thread = threading.Thread(target=keep_beating, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        beat()
