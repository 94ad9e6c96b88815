"""A full state disk does not kill the daemon: it stays up, says so (`status`, systemd STATUS=),
waits, and carries on when space is freed; nothing journaled is lost or half-written.

Real processes on a real small file system: the state folder lives on a 40 MiB tmpfs that the
test fills while a run trains, then empties again. Needs root (mount); skipped otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lora_service.daemon.statusfile import read_status
from lora_service.journal import Journal
from lora_service.journal import events as ev

from .test_daemon_e2e import drop_batch, events, stop, wait_for

TIMEOUT = 120
SLOW = {  # 12 steps, a checkpoint every 2: the disk fills between two of them
    "train": {"epochs": 6, "save_steps": 2},
    "schedule": {"on_arrival": True},
}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


DAEMON = Path(__file__).with_name("_daemon.py")


def fill(path: Path) -> int:
    """Append zeros to `path` until the file system refuses (ENOSPC); bytes written."""
    written = 0
    with open(path, "ab", buffering=0) as fh:
        for chunk in (1 << 20, 4096):
            while True:
                try:
                    written += fh.write(bytes(chunk))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return written


class Notifications:
    """A NOTIFY_SOCKET as systemd has one: every datagram the daemon sends, read at once."""

    def __init__(self, path: Path) -> None:
        self.address = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.done.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()


def lora(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lora_service", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_a_full_disk_is_waited_out_and_the_service_carries_on(
    write_config: Callable[..., Path], tmp_path: Path, small_disk: Path
) -> None:
    started = time.monotonic()
    config = write_config({**SLOW, "paths": {"state": "../disk/state"}})
    state, inbox, filler = small_disk / "state", tmp_path / "inbox", small_disk / "filler"
    notify = Notifications(tmp_path / "notify.sock")
    log = tmp_path / "daemon.log"

    def start() -> subprocess.Popen[str]:
        child_args = [["--fault", "step-delay=0.3"]] * 20  # every training child
        return subprocess.Popen(
            [sys.executable, str(DAEMON), str(config), json.dumps(child_args)],
            stdout=subprocess.DEVNULL, stderr=log.open("a"), text=True,
            env={**os.environ, "NOTIFY_SOCKET": notify.address},
        )

    def says_disk_full(daemon: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            status = read_status(state)
            if status.get("pid") == daemon.pid and (
                    status.get("problem") or "").startswith("the state disk refuses"):
                return
            assert time.monotonic() < deadline, "the daemon never said the disk is full"
            assert daemon.poll() is None, log.read_text()[-3000:]
            fill(filler)  # what a dying child frees, the next writer takes: keep it full
            time.sleep(0.2)

    daemon = start()
    try:
        drop_batch(inbox, "first", seed=1)
        wait_for(state, "CheckpointSaved", daemon=daemon)
        fill(filler)
        says_disk_full(daemon)
        shown = json.loads(lora(config, "status", "--json").stdout)["daemon"]
        text = lora(config, "status").stdout
        full_for = time.monotonic()
        # stopped and started again on the full disk (a reboot, systemd): it stays up too
        assert stop(daemon) == 0, log.read_text()[-3000:]
        daemon = start()
        says_disk_full(daemon)
        time.sleep(1)  # a few more ticks on the full disk
        assert daemon.poll() is None, log.read_text()[-3000:]
        filler.unlink()
        freed = time.monotonic()
        first = wait_for(state, "VersionCreated", daemon=daemon, timeout=TIMEOUT)[0]
        resumed_after = time.monotonic() - freed
        drop_batch(inbox, "second", seed=2)
        second = wait_for(state, "VersionCreated", 2, daemon=daemon, timeout=TIMEOUT)[1]
    finally:
        code = stop(daemon)
        notify.close()
    assert code == 0, log.read_text()[-3000:]
    assert shown["running"] and "No space left on device" in shown["problem"], shown
    assert "problem:   the state disk refuses writes" in text, text
    statuses = [m for m in notify.messages if m.startswith("STATUS=")]
    full = [i for i, m in enumerate(statuses) if "the state disk refuses writes" in m]
    assert full and "refuses" not in statuses[-1], statuses  # said, then cleared
    # a failure refused by the disk when the daemon stopped is not journaled, as after a crash:
    # the run stayed `running` and the next daemon resumed it
    failed = events(state, "RunFailed")
    assert all(f["reason"].startswith("disk: ") and not f["gave_up"] for f in failed), failed
    assert all(f["run_id"] == first["run_id"] for f in failed)
    resumed = events(state, "RunResumed")
    assert resumed and resumed[-1]["checkpoint"] is not None  # from a checkpoint, not step 0
    assert len(events(state, "ServiceStarted")) == 2  # the second one once there was room
    assert second["parent"] == first["version"]
    verified = lora(config, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    took = time.monotonic() - started
    print(f"disk full shown {full_for - started:.1f}s in; a version {resumed_after:.1f}s after "
          f"space was freed; whole test {took:.1f}s; status said: {shown['problem']!r}")


def test_what_counts_as_the_disks_fault(small_disk: Path) -> None:
    """ENOSPC and EIO however they surface (an OSError, sqlite's SQLITE_FULL inside a
    JournalError, safetensors' message); anything else is the work's own failure."""
    from lora_service.store import disk_trouble

    with Journal.for_state(small_disk / "state") as journal:
        fill(small_disk / "filler")
        with pytest.raises(Exception) as refused:
            journal.append(*(ev.BatchDetected(name="x" * 100_000) for _ in range(20)))
    assert "database or disk is full" in (disk_trouble(refused.value) or ""), refused.value
    assert disk_trouble(refused.value.__context__) == "database or disk is full"  # sqlite's own
    with pytest.raises(OSError) as full:
        (small_disk / "more").write_bytes(bytes(1 << 20))
    assert disk_trouble(full.value) == "No space left on device"
    assert disk_trouble(OSError(errno.EIO, "Input/output error")) == "Input/output error"
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")
    assert disk_trouble(wrapped) is not None
    assert disk_trouble(OSError(errno.ENOENT, "No such file or directory")) is None
    assert disk_trouble(ValueError("a bad payload")) is None
