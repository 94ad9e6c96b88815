"""The supervisor: holds the lock, journals its life, runs intake, schedule and training child.

Signal handlers only set a flag and wake the loop (as gunicorn's arbiter does); the loop does,
each tick: watchdog ping, reap a finished child, start the next child (an interrupted run first,
then a retry, then a requested run), write the status file. Intake runs in a thread of its own
with its own journal connection (SQLite serialises the two writers), so checking and copying a
batch of thousands of images never holds back the watchdog ping, a reap or a stop. This process
never imports torch: training, and building the base model, run in children.

Start-up is a replay: the projections already say which run was interrupted (status `running`
with no child alive, since the lock proves no other daemon exists), so it is resumed before
anything new starts; intake's rescan finishes any half-done batch. Temporary files and folders
that killed processes left in the state folder are removed first (`cleanup`).

The loop lives through what it cannot fix: when the state disk refuses a write (full, failing,
read-only: `store.disk_trouble`), the write is retried with a back-off, `status` and systemd's
STATUS= say why, and no child starts meanwhile; a `RunFailed` the disk refused waits in memory
and is journaled first once it takes writes again. A run that failed for the disk's sake does
not use up an attempt: it is retried after a back-off, and at once when the disk comes back. A
training child whose heartbeat stops for `train.stall_timeout` is stopped (SIGTERM, then SIGKILL)
and fails with reason `stalled`, retried like any failure.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from lora_service import __version__
from lora_service.config import Config
from lora_service.daemon import systemd
from lora_service.daemon.child import Child, ask_to_stop, child_argv, describe_exit
from lora_service.daemon.cleanup import remove_leftovers
from lora_service.daemon.plan import plan_run
from lora_service.daemon.schedule import Timetable
from lora_service.daemon.statusfile import overwrite_status, write_status
from lora_service.errors import ServiceError
from lora_service.inbox.intake import Hooks, Intake
from lora_service.inbox.labeller import make_labeller
from lora_service.inbox.watch import InboxWatcher
from lora_service.journal import Journal, queries
from lora_service.journal import events as ev
from lora_service.journal.sqlite import FAULTS
from lora_service.logs import get_logger, setup_logging
from lora_service.process import DISK_PREFIX, EX_TEMPFAIL, child_env
from lora_service.store import StateLock, disk_trouble

log = get_logger("lora_service.daemon")
TICK_S = 1.0
MAX_ATTEMPTS = 3
BACKOFF_S = (5.0, 30.0, 120.0)
STOP_TIMEOUT_S = 120.0
INTAKE_JOIN_S = 5.0
DISK_RETRY_S = (1.0, 2.0, 5.0)  # the daemon's own (small) writes, while the disk refuses
DISK_BACKOFF_S = (5.0, 30.0, 120.0, 600.0)  # a run that failed for the disk's sake
STALL_GRACE_S = 30.0  # a stalled child gets min(this, stall_timeout) to obey SIGTERM
HEARTBEAT = "child.heartbeat"
WRITE_ERRORS = (OSError, ServiceError, *FAULTS)  # JournalError is a ServiceError


class Supervisor:
    """`child_args`, `intake_hooks`: tests only, set where the daemon process starts (never
    read from the environment): extra arguments for the first training children, one tuple per
    start (e.g. `--fault step-delay=0.3`), and the intake's `Hooks`."""

    def __init__(self, config: Config, child_args: Sequence[Sequence[str]] = (),
                 intake_hooks: Hooks | None = None) -> None:
        self.config = config
        self.child_args = [tuple(args) for args in child_args]
        self.intake_hooks = intake_hooks
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
        self.disk: str | None = None  # why the state disk refuses our writes, while it does
        self.disk_refusals = 0  # in a row: they pick the retry delay
        self.disk_retry_at = 0.0
        self.disk_waits: dict[str, int] = {}  # run id -> failures for the disk's sake in a row
        self.backlog: list[ev.Event] = []  # events the disk refused, journaled first
        self.systemd_status = ""
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
            for path in remove_leftovers(self.state_dir):
                log.warning("removed what a killed process left", path=str(path))
            journal = Journal.for_state(self.state_dir, check=True)
            try:
                return self._serve(journal)
            finally:
                journal.close()

    # -- the loop ------------------------------------------------------------------------------

    def _serve(self, journal: Journal) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.backlog.append(
            ev.ServiceStarted(
                version=__version__,
                pid=os.getpid(),
                config_hash=self.config.digest(),
                config_path=str(self.config.source) if self.config.source else None,
                hostname=socket.gethostname(),
            )
        )
        try:
            self._flush(journal)
        except WRITE_ERRORS as exc:  # started on a full disk: journaled once it has room
            if (why := disk_trouble(exc)) is None:
                raise
            self._disk_refused(why)
        log.info("service started", state=str(self.state_dir), inbox=str(self.config.paths.inbox))
        if not self._register_base(journal):
            self.backlog.append(ev.ServiceStopped(pid=os.getpid(), reason=self.stopping or "stop"))
            self._flush(journal)
            return 0
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
        self.backlog.append(ev.ServiceStopped(pid=os.getpid(), reason=self.stopping or "error"))
        try:
            self._flush(journal)
        except WRITE_ERRORS as exc:
            if disk_trouble(exc) is None:
                raise
            # as after a crash: an unjournaled failure is a `running` run, resumed at start
            log.error("stopping without journaling", events=[e.type_name() for e in self.backlog],
                      reason=disk_trouble(exc))
        log.info("service stopped", reason=self.stopping)
        return 0

    def _intake_loop(self) -> None:
        """Scan the inbox at start, on every change and each tick (settling needs a clock)."""
        try:
            with Journal.for_state(self.state_dir) as journal:
                intake = Intake(journal, self.config, labeller=make_labeller(self.config),
                                hooks=self.intake_hooks)
                while not self.intake_done.is_set():
                    if self.disk is None:  # a batch would only fail half-copied: wait
                        for outcome in intake.scan():
                            log.info("batch", name=outcome.name, outcome=outcome.kind)
                            self.wake.set()  # an arrival may start a run
                    self.inbox_changed.wait(TICK_S)
                    self.inbox_changed.clear()
        except BaseException as exc:  # noqa: BLE001  (handed to the main loop, which fails)
            self.intake_error = exc
            self.wake.set()

    def _tick(self, journal: Journal) -> None:
        self._watch_child()
        if self.child is not None:
            code = self.child.poll()
            if code is not None:
                self._reap(journal, code)
        if time.monotonic() >= self.disk_retry_at:
            try:
                self._write_status()  # the smallest write first: does the disk take one?
                self._flush(journal)
                if self.child is None and self.stopping is None:
                    self._next_run(journal)
            except WRITE_ERRORS as exc:
                why = disk_trouble(exc)
                if why is None:
                    raise
                self._disk_refused(why)
            else:
                if self.disk is not None:
                    self._disk_back()
        self._tell_systemd()

    # -- a disk that refuses writes ------------------------------------------------------------

    def _flush(self, journal: Journal) -> None:
        """Journal what the disk refused before, in order, in one transaction."""
        if self.backlog:
            journal.append(*self.backlog)
            self.backlog.clear()

    def _disk_refused(self, why: str) -> None:
        self.disk_refusals += 1
        delay = DISK_RETRY_S[min(self.disk_refusals, len(DISK_RETRY_S)) - 1]
        self.disk_retry_at = time.monotonic() + delay
        if self.disk is None:
            log.error("the state disk refuses writes; waiting for it", reason=why)
        self.disk = why
        # the status file cannot be replaced: write over it, so `status` still says why
        overwrite_status(self.state_dir, self._status_info())

    def _disk_back(self) -> None:
        log.warning("the state disk takes writes again", was=self.disk)
        self.disk, self.disk_refusals = None, 0
        for run_id in self.disk_waits:  # what waited for space need not wait out its back-off
            self.retry_at[run_id] = time.monotonic()

    def _tell_systemd(self) -> None:
        """STATUS= for `systemctl status`: the problem if there is one, else what runs."""
        if self.child is not None:
            text = f"training {self.child.run_id}"
        else:
            text = "idle"
        problem = self._problem()
        if problem:
            text = f"{text}; {problem}"
        if text != self.systemd_status:
            self.systemd_status = text
            systemd.notify(f"STATUS={text}")

    def _problem(self) -> str | None:
        if self.disk is not None:
            return (f"the state disk refuses writes ({self.disk}; {self.state_dir}); nothing "
                    "new starts until it takes them again")
        return self.problem

    # -- children ------------------------------------------------------------------------------

    def _register_base(self, journal: Journal) -> bool:
        """Materialise and register the base model in a child (it imports torch); False when
        a stop came first. Building or hashing a real model takes minutes: systemd's start
        timeout is extended (EXTEND_TIMEOUT_USEC) while the child works, not raced."""
        if queries.base_registered(journal, self.config.base_model):
            return True
        log.info("registering base model", spec=self.config.base_model)
        proc = subprocess.Popen(child_argv(self.config, "--register-base"), env=child_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        extended = float("-inf")
        while True:
            if time.monotonic() - extended >= systemd.EXTEND_EVERY_S:
                systemd.extend_start_timeout()
                extended = time.monotonic()
            try:
                _, stderr = proc.communicate(timeout=TICK_S)
                break
            except subprocess.TimeoutExpired:
                if self.stopping is not None:  # the next start registers again
                    proc.kill()
                    proc.communicate()
                    return False
        if proc.returncode != 0:
            tail = stderr.strip().splitlines()[-1:] or ["no output"]
            raise ServiceError(f"base_model {self.config.base_model!r}: {tail[0]}")
        return True

    def _start(self, journal: Journal, run_id: str) -> None:
        self.child_seq = journal.last_seq()
        extra = self.child_args.pop(0) if self.child_args else ()
        self.child = Child.start(self.config, run_id, self.state_dir / HEARTBEAT, extra,
                                 on_exit=self.wake.set)
        if self.problem and self.problem.startswith(f"run {run_id} "):
            self.problem = None  # it waited for disk space; it is trying again now
        log.info("training child started", run_id=run_id, pid=self.child.proc.pid)

    def _watch_child(self) -> None:
        """Stop a child whose heartbeat has not moved for train.stall_timeout: SIGTERM (it may
        still checkpoint), then SIGKILL; `_reap` journals it as `stalled`."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        timeout = self.config.train.stall_timeout
        if child.stalled is None:
            idle = child.idle_for()
            if idle < timeout:
                return
            child.stalled = f"stalled: no progress for {idle:.0f} s (train.stall_timeout)"
            child.stalled_at = time.monotonic()
            log.error("training child makes no progress; stopping it", run_id=child.run_id,
                      pid=child.proc.pid, idle_s=round(idle))
            ask_to_stop(child.proc, child.launcher)
        elif time.monotonic() - child.stalled_at >= min(timeout, STALL_GRACE_S):
            log.error("stalled training child did not stop; killing it", run_id=child.run_id)
            child.kill()

    def _attempts(self, journal: Journal, run_id: str) -> int:
        """Failures that count toward MAX_ATTEMPTS: not those that were the disk's fault."""
        return queries.failures_counted(journal, run_id, not_prefix=DISK_PREFIX)

    def _reap(self, journal: Journal, code: int) -> None:
        """Judge a child that exited; a failure's RunFailed goes through the backlog, so a
        disk that refuses it now only delays it."""
        child, self.child = self.child, None
        assert child is not None
        if code == 0 and child.stalled is None:
            log.info("training child finished", run_id=child.run_id)
            self.disk_waits.pop(child.run_id, None)
            return
        run = queries.run(journal, child.run_id)
        if run and run["status"] == "finished":  # the journal has its version: no failure
            log.warning("training child exited after its run finished", run_id=child.run_id,
                        reason=describe_exit(code)[0])
            self.disk_waits.pop(child.run_id, None)
            return
        journaled = queries.last_failure(journal, child.run_id, since=self.child_seq)
        reason, signame = describe_exit(code)
        if child.stalled is not None:  # our own SIGKILL: not an out-of-memory kill
            then = "it ignored SIGTERM and was killed" if signame == "SIGKILL" else reason
            reason = f"{child.stalled}; {then}"
        elif code == EX_TEMPFAIL and not journaled:  # its own words, from its stderr
            said = re.findall(rf"^error: run {child.run_id} failed: ({DISK_PREFIX}.*)$",
                              child.stderr_tail(), re.MULTILINE)
            reason = said[-1] if said else f"{DISK_PREFIX}{reason} (the disk refused a write)"
        disk = (journaled.reason if journaled else reason).startswith(DISK_PREFIX)
        attempt = self._attempts(journal, child.run_id) + (0 if journaled and not disk else 1)
        gave_up = not disk and attempt >= MAX_ATTEMPTS
        if not journaled or gave_up:
            if journaled:
                last = (queries.run(journal, child.run_id) or {}).get("last_error")
                reason = f"gave up after {attempt} attempts; last: {last}"
            self.backlog.append(
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
        if disk:  # the disk's fault, not the run's: no attempt used, retried when it can be
            waits = self.disk_waits[child.run_id] = self.disk_waits.get(child.run_id, 0) + 1
            delay = DISK_BACKOFF_S[min(waits, len(DISK_BACKOFF_S)) - 1]
            why = journaled.reason if journaled else reason
            self.problem = f"run {child.run_id} waits for the disk ({why}); retry in {delay:.0f} s"
        else:
            self.disk_waits.pop(child.run_id, None)
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
        self.retry_at[child.run_id] = time.monotonic() + delay
        log.warning("training child failed", run_id=child.run_id, reason=reason, attempt=attempt,
                    gave_up=gave_up, disk=disk, status=run["status"] if run else None)

    def _next_run(self, journal: Journal) -> None:
        # 1. a run interrupted by a crash or a stop: resume it before anything else
        for run_id in queries.runs_with_status(journal, "running"):
            self._start(journal, run_id)
            return
        # 2. a failed run with attempts left, once its back-off has passed
        for run_id in queries.runs_with_status(journal, "failed"):
            if time.monotonic() >= self.retry_at.get(run_id, 0.0):
                self._start(journal, run_id)
                return
        # 3. the schedule or an arrival asks for a run when enough is pending
        self._maybe_request(journal)
        # 4. a request (train-now, schedule, arrival) not yet answered by a run
        for seq, fresh in queries.open_requests(journal, after=self.request_cursor):
            self.request_cursor = seq
            if self._plan(journal, seq, fresh):
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

    def _write_status(self) -> None:
        write_status(self.state_dir, self._status_info())

    def _status_info(self) -> dict[str, Any]:
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
            "problem": self._problem(),
            "heartbeat": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        return info
