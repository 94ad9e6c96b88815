"""The training schedule (apscheduler): cron or interval; fires only set a flag for the loop."""

from __future__ import annotations

import threading
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from lora_service.config import Schedule


class Timetable:
    """Wraps a BackgroundScheduler whose one job marks a run as due and wakes the main loop."""

    def __init__(self, schedule: Schedule, wake: threading.Event) -> None:
        self._wake = wake
        self._due = threading.Event()
        self._scheduler: BackgroundScheduler | None = None
        trigger = None
        if schedule.cron:
            trigger = CronTrigger.from_crontab(schedule.cron)
        elif schedule.interval:
            trigger = IntervalTrigger(seconds=schedule.interval)
        if trigger is not None:
            self._scheduler = BackgroundScheduler(daemon=True)
            self._job = self._scheduler.add_job(self._fire, trigger, id="train",
                                                coalesce=True, max_instances=1)

    def _fire(self) -> None:
        self._due.set()
        self._wake.set()

    def start(self) -> None:
        if self._scheduler is not None:
            self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def take_due(self) -> bool:
        """True once per fire (coalesced): the loop consumes it."""
        if self._due.is_set():
            self._due.clear()
            return True
        return False

    def next_run(self) -> datetime | None:
        if self._scheduler is None:
            return None
        return getattr(self._job, "next_run_time", None)  # None until the scheduler starts
