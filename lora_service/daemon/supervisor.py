"""The supervisor: holds the lock, journals its life, runs intake, schedule and training child.

Signal handlers only set a flag and wake the loop (as gunicorn's arbiter does); the loop does,
each tick: watchdog ping, reap a finished child, start the next child (an interrupted run first,
then a retry, then a requested run), write the status file. Intake runs in a thread of its own
with its own journal connection (SQLite serialises the two writers), so checking and copying a
batch of thousands of images never holds back the watchdog ping, a reap or a stop. This process
never imports torch: training, and building the base model, run in children.

Start-up is a replay: the projections already say which run was interrupted (status `running`
with no child alive, since the lock proves no other daemon exists), so it is resumed before
anything new starts; intake's rescan finishes any half-done batch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from lora_service import __version__
from lora_service.config import Config
from lora_service.daemon import systemd
from lora_service.daemon.child import Child, child_argv, child_env, describe_exit
from lora_service.daemon.schedule import Timetable
from lora_service.daemon.statusfile import write_status
from lora_service.errors import ServiceError
from lora_service.inbox.intake import Intake
from lora_service.inbox.watch import InboxWatcher
from lora_service.journal import Journal, queries
from lora_service.journal import events as ev
from lora_service.labelling import make_labeller
from lora_service.logs import get_logger, setup_logging
from lora_service.store import StateLock

log = get_logger("lora_service.daemon")
TICK_S = 1.0
MAX_ATTEMPTS = 3
BACKOFF_S = (5.0, 30.0, 120.0)
STOP_TIMEOUT_S = 120.0
INTAKE_JOIN_S = 5.0


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.paths.state
        self.wake = threading.Event()
        self.stopping: str | None = None
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.child: Child | None = None
        self.child_seq = 0  # journal position when the child started
        self.retry_at: dict[str, float] = {}
        self.request_cursor = 0  # TrainingRequested events up to here are handled
        self.triggered_for: frozenset[str] = frozenset()  # pending set of the last auto request
        self.problem: str | None = None
        self.inbox_changed = threading.Event()
        self.intake_done = threading.Event()  # set when the main loop ends, however it ends
        self.intake_error: BaseException | None = None
        self.timetable = Timetable(config.schedule, self.wake)

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

    # -- the loop ------------------------------------------------------------------------------

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
        self._register_base(journal)
        intake = threading.Thread(target=self._intake_loop, name="intake", daemon=True)
        intake.start()
        watcher = InboxWatcher(self.config.paths.inbox, self.inbox_changed.set).start()
        self.timetable.start()
        systemd.notify("READY=1")
        watchdog = systemd.watchdog_interval()
        last_ping = 0.0
        try:
            while self.stopping is None:
                now = time.monotonic()
                if watchdog and now - last_ping >= watchdog:
                    systemd.notify("WATCHDOG=1")
                    last_ping = now
                if self.intake_error is not None:
                    raise self.intake_error
                self._tick(journal)
                self.wake.wait(min(TICK_S, watchdog or TICK_S))
                self.wake.clear()
        finally:
            systemd.notify("STOPPING=1")
            self.intake_done.set()
            self.inbox_changed.set()
            if self.child is not None:
                log.info("stopping training child", run_id=self.child.run_id)
                code = self.child.terminate(STOP_TIMEOUT_S)
                self._reap(journal, code)
            watcher.stop()
            self.timetable.stop()
            intake.join(INTAKE_JOIN_S)  # a batch cut short is finished at the next start
        journal.append(ev.ServiceStopped(pid=os.getpid(), reason=self.stopping or "error"))
        log.info("service stopped", reason=self.stopping)
        return 0

    def _intake_loop(self) -> None:
        """Scan the inbox at start, on every change and each tick (settling needs a clock)."""
        try:
            with Journal.for_state(self.state_dir) as journal:
                intake = Intake(journal, self.config, labeller=make_labeller(self.config))
                while not self.intake_done.is_set():
                    for outcome in intake.scan():
                        log.info("batch", name=outcome.name, outcome=outcome.kind)
                        self.wake.set()  # an arrival may start a run
                    self.inbox_changed.wait(TICK_S)
                    self.inbox_changed.clear()
        except BaseException as exc:  # noqa: BLE001  (handed to the main loop, which fails)
            self.intake_error = exc
            self.wake.set()

    def _tick(self, journal: Journal) -> None:
        if self.child is not None:
            code = self.child.poll()
            if code is not None:
                self._reap(journal, code)
        if self.child is None and self.stopping is None:
            self._next_run(journal)
        self._write_status(journal)

    # -- children ------------------------------------------------------------------------------

    def _register_base(self, journal: Journal) -> None:
        """Materialise and register the base model in a child (it imports torch)."""
        known = journal.query("SELECT 1 FROM base_models WHERE spec = ?", [self.config.base_model])
        if known:
            return
        log.info("registering base model", spec=self.config.base_model)
        result = subprocess.run(child_argv(self.config, "--register-base"), env=child_env(),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
            raise ServiceError(f"base_model {self.config.base_model!r}: {tail[0]}")

    def _start(self, journal: Journal, run_id: str) -> None:
        self.child_seq = journal.last_seq()
        self.child = Child.start(self.config, run_id)
        log.info("training child started", run_id=run_id, pid=self.child.proc.pid)

    def _attempts(self, journal: Journal, run_id: str) -> int:
        rows = journal.query(
            "SELECT count(*) AS n FROM events WHERE type = 'RunFailed'"
            " AND json_extract(payload, '$.run_id') = ?",
            [run_id],
        )
        return int(rows[0]["n"])

    def _reap(self, journal: Journal, code: int) -> None:
        child, self.child = self.child, None
        assert child is not None
        if code == 0:
            log.info("training child finished", run_id=child.run_id)
            return
        run = journal.query("SELECT status FROM runs WHERE run_id = ?", [child.run_id])
        if run and run[0]["status"] == "finished":  # the journal has its version: no failure
            log.warning("training child exited after its run finished", run_id=child.run_id,
                        reason=describe_exit(code)[0])
            return
        journaled = journal.query(
            "SELECT max(seq) AS seq FROM events WHERE type = 'RunFailed' AND seq > ?"
            " AND json_extract(payload, '$.run_id') = ?",
            [self.child_seq, child.run_id],
        )[0]["seq"]
        attempt = self._attempts(journal, child.run_id) + (0 if journaled else 1)
        gave_up = attempt >= MAX_ATTEMPTS
        reason, signame = describe_exit(code)
        if not journaled or gave_up:
            if journaled:
                last = journal.query("SELECT last_error FROM runs WHERE run_id = ?",
                                     [child.run_id])[0]["last_error"]
                reason = f"gave up after {attempt} attempts; last: {last}"
            journal.append(
                ev.RunFailed(
                    run_id=child.run_id,
                    reason=reason,
                    attempt=attempt,
                    exit_code=code if code >= 0 else None,
                    signal=signame,
                    stderr_tail=child.stderr_tail(),
                    gave_up=gave_up,
                )
            )
        delay = BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
        self.retry_at[child.run_id] = time.monotonic() + delay
        log.warning("training child failed", run_id=child.run_id, reason=reason,
                    attempt=attempt, gave_up=gave_up, status=run[0]["status"] if run else None)

    def _next_run(self, journal: Journal) -> None:
        # 1. a run interrupted by a crash or a stop: resume it before anything else
        for run in journal.query("SELECT run_id FROM runs WHERE status = 'running'"
                                 " ORDER BY started_seq"):
            self._start(journal, run["run_id"])
            return
        # 2. a failed run with attempts left, once its back-off has passed
        for run in journal.query("SELECT run_id FROM runs WHERE status = 'failed'"
                                 " ORDER BY started_seq"):
            if time.monotonic() >= self.retry_at.get(run["run_id"], 0.0):
                self._start(journal, run["run_id"])
                return
        # 3. the schedule or an arrival asks for a run when enough is pending
        self._maybe_request(journal)
        # 4. a request (train-now, schedule, arrival) not yet answered by a run
        for request in journal.query(
            "SELECT seq, fresh FROM requests WHERE run_id IS NULL AND seq > ? ORDER BY seq",
            [self.request_cursor],
        ):
            self.request_cursor = request["seq"]
            if self._plan(journal, request["seq"], bool(request["fresh"])):
                return

    def _maybe_request(self, journal: Journal) -> None:
        schedule = self.config.schedule
        due = self.timetable.take_due()
        if not (due or schedule.on_arrival):
            return
        pending = frozenset(queries.pending_batches(journal))
        if not pending or queries.pending_images(journal) < schedule.min_new_images:
            return
        if not due and pending == self.triggered_for:
            return  # this arrival was already answered (or could not be trained)
        self.triggered_for = pending
        journal.append(ev.TrainingRequested(reason="schedule" if due else "arrival",
                                            pid=os.getpid()))

    def _plan(self, journal: Journal, request_seq: int, fresh: bool) -> bool:
        from lora_service.training.plan import plan_run

        try:
            run = plan_run(journal, self.config, fresh=fresh, request_seq=request_seq)
        except ServiceError as exc:
            self.problem = str(exc)
            log.error("cannot plan a run", reason=str(exc))
            return False
        if run is None:
            log.info("nothing new to train", request_seq=request_seq)
            return False
        self.problem = None
        journal.append(run)
        self._start(journal, run.run_id)
        return True

    def _write_status(self, journal: Journal) -> None:
        next_run = self.timetable.next_run()
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "next_run": next_run.isoformat() if next_run else None,
            "on_arrival": self.config.schedule.on_arrival,
            "child": (
                {"run_id": self.child.run_id, "pid": self.child.proc.pid}
                if self.child is not None
                else None
            ),
            "problem": self.problem,
            "heartbeat": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_status(self.state_dir, info)
