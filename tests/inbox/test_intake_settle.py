"""Completeness: a folder still being written is never read; READY makes it read at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lora_service.inbox.intake import Intake
from lora_service.journal import events as ev

from .conftest import Env, drop, image_bytes, sha


def test_slowly_copied_folder_is_read_only_once_stable(make_env: Callable[..., Env]) -> None:
    env = make_env({"inbox": {"settle_seconds": 1.0}})
    data = image_bytes(1, size=48)
    folder = drop(env.inbox / "slow", {"slow.txt": "written slowly"}, ready=False)
    chunks = [data[i:i + 40] for i in range(0, len(data), 40)]
    finished_at: list[float] = []

    def writer() -> None:
        with open(folder / "slow.png", "wb") as fh:
            for i, chunk in enumerate(chunks):
                if i:
                    time.sleep(2.5 / len(chunks))
                fh.write(chunk)
                fh.flush()
            finished_at.append(time.time())  # the last write

    thread = threading.Thread(target=writer)
    thread.start()
    decided_at = None
    deadline = time.time() + 15
    while time.time() < deadline:
        if env.intake.scan():
            decided_at = time.time()
            break
        time.sleep(0.05)
    thread.join()
    assert decided_at is not None and finished_at
    assert len(chunks) >= 5
    assert decided_at >= finished_at[0] + 1.0  # not before the last write had settled
    [accepted] = env.events("BatchAccepted")
    assert isinstance(accepted, ev.BatchAccepted)
    assert not accepted.bad
    assert accepted.images[0].sha256 == sha(data)  # the whole file, never a prefix
    [detected] = list(env.journal.events(types=("BatchDetected",)))
    accepted_at = list(env.journal.events(types=("BatchAccepted",)))[0]
    assert detected.seq < accepted_at.seq


def test_ready_marker_makes_it_read_at_once(make_env: Callable[..., Env]) -> None:
    env = make_env({"inbox": {"settle_seconds": 60}})
    folder = drop(env.inbox / "quick", {"a.png": image_bytes(1), "a.txt": "a"}, ready=False)
    assert env.intake.scan() == []
    assert env.events("BatchDetected")  # seen, not decided
    assert not env.events("BatchAccepted")
    (folder / "READY").write_text("")
    [outcome] = env.intake.scan()
    assert outcome.status == "accepted"
    assert len(env.events("BatchDetected")) == 1  # one arrival, one detection


def test_rescan_at_startup_takes_old_folders_and_waits_for_fresh_ones(env: Env) -> None:
    """First sighting: a folder unchanged (by ctime) for settle_seconds is complete at once; a
    fresh one waits. A restart therefore picks up what arrived while the daemon was down."""
    drop(env.inbox / "old", {"a.png": image_bytes(1), "a.txt": "a"}, ready=False)
    time.sleep(env.config.inbox.settle_seconds + 0.1)
    drop(env.inbox / "fresh", {"b.png": image_bytes(2), "b.txt": "b"}, ready=False)
    intake = Intake(env.journal, env.config)
    assert [o.name for o in intake.scan()] == ["old"]
    time.sleep(env.config.inbox.settle_seconds + 0.1)
    assert [o.name for o in intake.scan()] == ["fresh"]


def test_empty_folder_is_not_a_batch_yet(env: Env) -> None:
    (env.inbox / "mkdir-first").mkdir(parents=True)
    time.sleep(env.config.inbox.settle_seconds + 0.1)
    assert env.intake.scan() == []
    assert env.events() == []
