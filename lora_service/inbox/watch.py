"""Wakes the intake when something changes in the inbox (watchdog), so `Intake.scan` runs soon
after a drop instead of on the next periodic tick.

The watcher only signals: `on_change` runs in watchdog's observer thread and must be cheap (set
an event, enqueue a wake-up); the scan itself runs in the daemon's own loop. Events under the
inbox's dot-folders (`.accepted`, `.rejected`) and read-only events (`opened`,
`closed_no_write`, which the intake's own reads cause) are ignored, so intake does not wake
itself up in a loop. A missed event costs only latency: the daemon also scans periodically.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

_READ_ONLY = {"opened", "closed_no_write"}


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Path, on_change: Callable[[], None]) -> None:
        self.inbox = inbox
        self.on_change = on_change

    def _relevant(self, path: str | bytes) -> bool:
        path = os.fsdecode(path)
        try:
            rel = Path(path).relative_to(self.inbox)
        except ValueError:
            return False
        # the inbox itself only reports "an entry changed"; the entry has its own event
        return bool(rel.parts) and not rel.parts[0].startswith(".")

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _READ_ONLY:
            return
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        if any(p and self._relevant(p) for p in paths):
            self.on_change()


class InboxWatcher:
    """A watchdog Observer on the inbox (recursive) that calls `on_change` on every change."""

    def __init__(self, inbox_path: Path, on_change: Callable[[], None]) -> None:
        self.inbox = Path(inbox_path)
        self.on_change = on_change
        self._observer: Observer | None = None  # type: ignore[valid-type]

    def start(self) -> InboxWatcher:
        self.inbox.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(self.inbox, self.on_change), str(self.inbox), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None

    def __enter__(self) -> InboxWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
