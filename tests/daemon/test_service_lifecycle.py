"""The daemon process: lock, ServiceStarted/ServiceStopped, SIGTERM, sd_notify, no torch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lora_service.config import Config
from lora_service.daemon.child import Child
from lora_service.daemon.supervisor import Supervisor
from lora_service.journal import Journal
from lora_service.journal import events as ev

TIMEOUT = 60


DAEMON = Path(__file__).with_name("_daemon.py")


def start(config: Path, seams: dict | None = None, **env: str) -> subprocess.Popen[str]:
    """`lora-service run`; with `seams`, tests/daemon/_daemon.py sets them where it starts."""
    argv = [sys.executable, "-m", "lora_service", "run", "--config", str(config)]
    if seams:
        argv = [sys.executable, str(DAEMON), str(config), json.dumps(seams)]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env},
    )


def wait_for_event(state: Path, type_: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state / "journal.sqlite").exists():
            with Journal.for_state(state) as journal:
                if any(True for _ in journal.events(types=(type_,))):
                    return
        time.sleep(0.1)
    raise AssertionError(f"no {type_} within {timeout}s")


def test_run_journals_start_and_stop_and_refuses_a_second_instance(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config()
    state = tmp_path / "state"
    daemon = start(config)
    try:
        wait_for_event(state, "BaseModelRegistered")  # a stop before it would cut it short
        second = subprocess.run(
            [sys.executable, "-m", "lora_service", "run", "--config", str(config)],
            capture_output=True, text=True, timeout=TIMEOUT,
        )
        assert second.returncode == 2
        assert "another lora-service daemon is running" in second.stderr
        assert f"pid {daemon.pid}" in second.stderr
        status = subprocess.run(
            [sys.executable, "-m", "lora_service", "status", "--json", "--config", str(config)],
            capture_output=True, text=True, timeout=TIMEOUT,
        )
        assert '"running": true' in status.stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=TIMEOUT)
    assert daemon.returncode == 0, daemon.stderr.read() if daemon.stderr else ""
    with Journal.for_state(state) as journal:
        types = [e.type for e in journal.events()]
    assert types == ["ServiceStarted", "BaseModelRegistered", "ServiceStopped"]
    assert (state / "logs" / "train.log").read_text().count("service started") == 1


def test_sd_notify_ready_then_watchdog(write_config: Callable[..., Path], tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(TIMEOUT)
    daemon = start(write_config(), NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
    messages: list[str] = []
    try:
        while messages.count("WATCHDOG=1") < 2:
            messages.append(sock.recv(256).decode())
    finally:
        daemon.send_signal(signal.SIGINT)
        daemon.wait(timeout=TIMEOUT)
        sock.close()
    lifecycle = [m for m in messages if not m.startswith(("STATUS=", "EXTEND_TIMEOUT_USEC="))]
    assert lifecycle == ["READY=1", "WATCHDOG=1", "WATCHDOG=1"], messages
    assert daemon.returncode == 0


def test_base_registration_extends_the_start_timeout(write_config: Callable[..., Path],
                                                     tmp_path: Path) -> None:
    """Registering the base model (minutes for a real one) runs before READY=1: the daemon
    asks systemd for more start time while it works instead of racing TimeoutStartSec."""
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(TIMEOUT)
    daemon = start(write_config(), NOTIFY_SOCKET=address)
    messages: list[str] = []
    try:
        while "READY=1" not in messages:
            messages.append(sock.recv(256).decode())
        messages.append(sock.recv(256).decode())  # the first STATUS= after READY
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=TIMEOUT)
        sock.close()
    before_ready = messages[: messages.index("READY=1")]
    extends = [m for m in before_ready if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extends, messages
    assert all(int(m.split("=")[1]) >= 20_000_000 for m in extends), extends
    assert messages[-1] == "STATUS=idle", messages
    with Journal.for_state(tmp_path / "state") as journal:
        assert [e.type for e in journal.events()][:2] == ["ServiceStarted", "BaseModelRegistered"]
    assert daemon.returncode == 0


def test_the_supervisor_never_imports_torch(write_config: Callable[..., Path]) -> None:
    probe = (
        "import sys, threading, signal, os\n"
        "from lora_service.config import load_config\n"
        "from lora_service.daemon.supervisor import Supervisor\n"
        "from lora_service.cli import cli\n"
        "s = Supervisor(load_config(sys.argv[1]))\n"
        "threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()\n"
        "assert s.run() == 0\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'open_clip')"
        " if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(write_config())],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_child_killed_after_its_version_exists_is_not_a_failure(config: Config) -> None:
    """A stop can land in the child's slow teardown after VersionCreated: the journal, not the
    exit status, says whether the run failed (else a finished run would be trained again)."""
    base = "0" * 64
    started = dict(parent=None, fresh=True, batches=("b",), base_sha256=base, start_step=0,
                   total_steps=4, learning_rate=1e-4, epochs=1, seed=0, threads=1, config={})
    with Journal.for_state(config.paths.state) as journal:
        journal.append(
            ev.RunStarted(run_id="r0001", **started),
            ev.VersionCreated(version="v0001", run_id="r0001", parent=None, batches=("b",),
                              new_batches=("b",), images=4, step=4, steps=4, train_loss=None,
                              val_loss=None, base_sha256=base),
            ev.RunStarted(run_id="r0002", **started),
        )
        supervisor = Supervisor(config)
        for run_id in ("r0001", "r0002"):
            killed = subprocess.Popen([sys.executable, "-c",
                                       "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
            supervisor.child = Child(run_id, killed)
            supervisor._reap(journal, killed.wait())
            supervisor._flush(journal)  # a failure is journaled through the backlog
        failed = [e.payload["run_id"] for e in journal.events(types=("RunFailed",))]
        assert failed == ["r0002"]
        status = {r["run_id"]: r["status"] for r in journal.query("SELECT * FROM runs")}
        assert status == {"r0001": "finished", "r0002": "failed"}


def test_a_slow_batch_does_not_hold_back_the_watchdog(write_config: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    """Intake runs beside the main loop: pings keep coming while a batch takes 4 s."""
    from .test_daemon_e2e import drop_batch, events

    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.1)
    config = write_config({"schedule": {"on_arrival": False}})
    daemon = start(config, {"intake_delay": 4}, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
    state, pings = tmp_path / "state", []
    try:
        wait_for_event(state, "ServiceStarted")
        drop_batch(tmp_path / "inbox", "slow")
        deadline = time.monotonic() + TIMEOUT
        while not events(state, "BatchAccepted") and time.monotonic() < deadline:
            try:
                if sock.recv(256) == b"WATCHDOG=1":
                    pings.append(time.monotonic())
            except TimeoutError:
                pass
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=TIMEOUT)
        sock.close()
    assert events(state, "BatchAccepted") and daemon.returncode == 0
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert len(pings) > 10 and max(gaps) < 2.0, f"{len(pings)} pings, longest gap {max(gaps)}"
