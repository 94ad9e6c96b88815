"""Read commands never create a state, and they work on a read-only one (item 12).

The real test of "read-only" is a read-only bind mount: root ignores file modes, and a
read-only file system is what an operator gets from `ro` in a container or a snapshot. It
needs mount privileges and is skipped without them; the chmod variant covers non-root runs.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lora_service.journal import Journal
from lora_service.journal import events as ev

READS = [
    ("status",), ("events",), ("verify",), ("versions",), ("loss",), ("batches",),
    ("audit", "v0001"), ("compare",), ("sample", "v0001", "--prompt", "x", "-o", "x.png"),
]
WRITES = [("requeue", "b"), ("rollback", "v0001", "--reason", "r"), ("promote", "v0001"),
          ("export", "v0001", "-o", "x.safetensors")]


def lora(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lora_service", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@contextmanager
def read_only_mount(source: Path, target: Path) -> Iterator[Path]:
    """`target` shows `source` read-only (EROFS for every write, root's too)."""
    target.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def _journal(state: Path) -> None:
    with Journal.for_state(state) as journal:
        journal.append(ev.BatchDetected(name="one"), ev.BatchDetected(name="two"))


@pytest.mark.parametrize("args", READS + WRITES, ids=lambda a: a[0])
def test_no_command_creates_a_state(
    write_config: Callable[..., Path], tmp_path: Path, args: tuple[str, ...]
) -> None:
    config = write_config()
    result = lora(*args, "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"lora-service: no state at {tmp_path / 'state'} (no journal.sqlite; the daemon "
        "creates it)\n"
    )
    assert not (tmp_path / "state").exists()


def _reads_see(config: Path, seq: int) -> None:
    status = lora("status", "--config", str(config))
    assert status.returncode == 0, status.stderr
    assert f"journal:   seq {seq}" in status.stdout
    events = lora("events", "--json", "--config", str(config))
    assert events.returncode == 0 and len(events.stdout.splitlines()) == seq
    verify = lora("verify", "--config", str(config))
    assert verify.returncode == 0 and verify.stdout == f"ok: {seq} events, 0 files checked\n"
    for args in (("versions", "--json"), ("loss", "--json"), ("batches", "--json")):
        result = lora(*args, "--config", str(config))
        assert result.returncode == 0, (args, result.stderr)


def test_reads_work_and_writes_refuse_on_a_read_only_mount(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A cleanly closed journal has no -wal/-shm and a read-only folder cannot get them:
    SQLite's mode=ro alone cannot open it there ("unable to open database file")."""
    _journal(tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["journal.sqlite"]
    with read_only_mount(tmp_path / "state", tmp_path / "ro") as ro:
        config = write_config({"paths": {"state": str(ro)}})
        _reads_see(config, 2)
        for args in WRITES:
            result = lora(*args, "--config", str(config), cwd=tmp_path)
            assert result.returncode == 2 and "Traceback" not in result.stderr
            assert result.stderr == (
                f"lora-service: {ro}: the state is read-only; this command writes the journal\n"
            )


def test_reads_on_a_read_only_mount_see_a_live_writer(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """While a writer (the daemon) has the journal open, -wal/-shm exist: readers use them
    (mode=ro), so they see events that are still only in the WAL."""
    state = tmp_path / "state"
    _journal(state)
    with Journal.for_state(state) as writer, read_only_mount(state, tmp_path / "ro") as ro:
        writer.append(ev.BatchDetected(name="three"))
        assert (state / "journal.sqlite-wal").stat().st_size > 0
        config = write_config({"paths": {"state": str(ro)}})
        _reads_see(config, 3)
        writer.append(ev.BatchDetected(name="four"))
        _reads_see(config, 4)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes (the mount test covers it)")
def test_reads_work_on_a_state_without_write_permission(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    _journal(state)
    (state / "journal.sqlite").chmod(0o444)
    state.chmod(0o555)
    try:
        config = write_config()
        _reads_see(config, 2)
        result = lora("requeue", "b", "--config", str(config))
        assert result.returncode == 2 and "read-only" in result.stderr
    finally:
        state.chmod(0o755)


def test_events_since_past_sqlite_integers_is_bad_usage(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    _journal(tmp_path / "state")
    result = lora("events", "--since", "99999999999999999999999", "--config", str(write_config()))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "--since" in result.stderr and "0<=x<=9223372036854775807" in result.stderr


def _copy_with_wal_only(state: Path, copy: Path) -> int:
    """What a copy of a running daemon's state holds: journal.sqlite and its -wal (the newest
    event only there), no -shm. Returns the events it holds."""
    _journal(state)
    copy.mkdir()
    with Journal.for_state(state) as writer:
        writer.append(ev.BatchDetected(name="three"))
        for name in ("journal.sqlite", "journal.sqlite-wal"):
            shutil.copy(state / name, copy / name)
    main_only = sqlite3.connect(f"file:{copy / 'journal.sqlite'}?mode=ro&immutable=1", uri=True)
    assert main_only.execute("SELECT count(*) FROM events").fetchone()[0] == 2
    main_only.close()
    return 3


def test_reads_on_a_read_only_copy_with_a_wal_and_no_shm_see_every_event(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """The -shm a WAL reader needs cannot be created on a read-only mount; the reads still see
    the events that are only in the -wal (exact, not the main file alone), and create nothing."""
    seqs = _copy_with_wal_only(tmp_path / "state", tmp_path / "copy")
    with read_only_mount(tmp_path / "copy", tmp_path / "ro") as ro:
        config = write_config({"paths": {"state": str(ro)}})
        _reads_see(config, seqs)
        assert sorted(p.name for p in ro.iterdir()) == ["journal.sqlite", "journal.sqlite-wal"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes (the mount test covers it)")
def test_reads_on_an_unwritable_copy_with_a_wal_and_no_shm_see_every_event(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    seqs = _copy_with_wal_only(tmp_path / "state", copy)
    copy.chmod(0o555)
    try:
        _reads_see(write_config({"paths": {"state": str(copy)}}), seqs)
    finally:
        copy.chmod(0o755)


def test_a_read_in_a_writable_folder_leaves_only_sqlites_own_files(tmp_path: Path) -> None:
    """What the docstring promises: the journal's bytes unchanged; SQLite's -wal (empty) and
    -shm may stay, they hold no state."""
    state = tmp_path / "state"
    _journal(state)
    before = (state / "journal.sqlite").read_bytes()
    with Journal.for_state(state, mode="read") as journal:
        assert journal.last_seq() == 2
    assert (state / "journal.sqlite").read_bytes() == before
    assert {p.name for p in state.iterdir()} <= {
        "journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"}
    wal = state / "journal.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0


def test_the_daemon_and_train_now_on_a_read_only_mount_are_one_line(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """What starts training (the daemon, a foreground train-now) needs the lock and the logs:
    on a read-only state each says so in one line, exit 2, and nothing changes."""
    _journal(tmp_path / "state")
    with read_only_mount(tmp_path / "state", tmp_path / "ro") as ro:
        config = write_config({"paths": {"state": str(ro)}})
        for args in (("train-now",), ("run",)):
            result = lora(*args, "--config", str(config), cwd=tmp_path)
            assert result.returncode == 2, result.stderr
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
            assert str(ro) in result.stderr and "Read-only file system" in result.stderr
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["journal.sqlite"]
