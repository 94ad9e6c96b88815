"""The supervisor: holds the lock, journals its life, and runs the main loop.

Signal handlers only set a flag and wake the loop (as gunicorn's arbiter does); all work happens
in the loop. This process never imports torch: training runs in a child process.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from types import FrameType

from lora_service import __version__
from lora_service.config import Config
from lora_service.daemon import systemd
from lora_service.daemon.statusfile import write_status
from lora_service.journal import Journal
from lora_service.journal import events as ev
from lora_service.logs import get_logger, setup_logging
from lora_service.store import StateLock

log = get_logger("lora_service.daemon")
TICK_S = 1.0


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.paths.state
        self.wake = threading.Event()
        self.stopping: str | None = None
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = signal.Signals(signum).name
        self.wake.set()

    def run(self) -> int:
        setup_logging(self.config)
        self.config.paths.inbox.mkdir(parents=True, exist_ok=True)
        with StateLock(self.state_dir):
            journal = Journal.for_state(self.state_dir, check=True)
            try:
                return self._serve(journal)
            finally:
                journal.close()

    def _serve(self, journal: Journal) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        journal.append(
            ev.ServiceStarted(
                version=__version__,
                pid=os.getpid(),
                config_hash=self.config.digest(),
                config_path=str(self.config.source) if self.config.source else None,
                hostname=socket.gethostname(),
            )
        )
        log.info("service started", state=str(self.state_dir), inbox=str(self.config.paths.inbox))
        systemd.notify("READY=1")
        watchdog = systemd.watchdog_interval()
        last_ping = 0.0
        while self.stopping is None:
            now = time.monotonic()
            if watchdog and now - last_ping >= watchdog:
                systemd.notify("WATCHDOG=1")
                last_ping = now
            self._write_status()
            self.wake.wait(min(TICK_S, watchdog or TICK_S))
            self.wake.clear()
        systemd.notify("STOPPING=1")
        journal.append(ev.ServiceStopped(pid=os.getpid(), reason=self.stopping))
        log.info("service stopped", reason=self.stopping)
        return 0

    def _write_status(self) -> None:
        write_status(
            self.state_dir,
            {"pid": os.getpid(), "started_at": self.started_at, "next_run": None},
        )
