"""SIGKILL during intake, in a real child process: the next scan finishes or redoes every batch,
each ends accepted/rejected/duplicate exactly once, the journal chain and projections hold,
the store has no folder without its event, and no image is lost from the inbox."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_service.inbox.intake import Intake
from lora_service.journal import Journal, projections
from lora_service.journal import events as ev
from lora_service.journal.sqlite import GENESIS, event_hash
from lora_service.journal.verify import verify

from .conftest import Env, drop, image_bytes, sha

CHILD = Path(__file__).with_name("_intake_child.py")
FINAL = ("BatchAccepted", "BatchRejected", "BatchDuplicate")


def child(config_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(config_path), *args], stdout=subprocess.PIPE, text=True
    )


def batch_files(kind: str, seed: int, images: int = 6) -> dict[str, bytes | str]:
    """good: captioned images; bad: nothing usable; mixed: some of each."""
    files: dict[str, bytes | str] = {}
    for i in range(images):
        files[f"img{i:02d}.png"] = image_bytes(seed * 100 + i, size=40)
        files[f"img{i:02d}.txt"] = f"picture {seed} number {i}"
    if kind == "bad":
        files = {name: b"broken" if name.endswith(".png") else text
                 for name, text in files.items()}
    elif kind == "mixed":
        files["junk.png"] = b"\x89PNG broken"
        files["nocap.png"] = image_bytes(seed * 100 + 99)
    return files


def check_invariants(journal: Journal, inbox: Path, state: Path,
                     drops: dict[str, dict[str, bytes | str]]) -> dict[str, str]:
    """Assert every guarantee; return {drop name: final event type}."""
    stored = list(journal.events())
    # 1. hash chain: each event links to the previous one and its own hash is right
    prev = GENESIS
    for e in stored:
        assert e.prev_hash == prev, f"chain broken at seq {e.seq}"
        assert e.hash == event_hash(prev, e.seq, e.ts, e.type, e.schema, e.payload)
        prev = e.hash
    # 2. projections rebuilt from the events alone equal the live ones
    mem = sqlite3.connect(":memory:")
    projections.create_tables(mem)
    for e in stored:
        projections.apply(mem, projections.changes(e.seq, e.ts, e.event))
    for table in ("intakes", "batches", "batch_images", "files"):
        assert projections.snapshot(mem, table) == projections.snapshot(journal.conn, table)
    # ... and the service's own `verify` (chain, projections, files) agrees
    report = verify(journal, state)
    assert report.ok, report.problems
    assert report.files == sum(len(e.event.files) for e in stored)
    # 3. every drop decided exactly once, detected exactly once
    finals: dict[str, list[ev.Event]] = {}
    detected: dict[str, int] = {}
    for e in stored:
        event = e.event
        if e.type in FINAL:
            finals.setdefault(event.name, []).append(event)  # type: ignore[attr-defined]
        if e.type == "BatchDetected":
            detected[event.name] = detected.get(event.name, 0) + 1  # type: ignore[attr-defined]
    assert {n: len(v) for n, v in finals.items()} == {n: 1 for n in drops}
    assert detected == {n: 1 for n in drops}
    # 4. the store holds exactly the accepted batches, each file with its journaled sha256
    accepted = [v[0] for v in finals.values() if isinstance(v[0], ev.BatchAccepted)]
    store = state / "batches"
    on_disk = sorted(p.name for p in store.iterdir()) if store.exists() else []
    assert on_disk == sorted(a.batch_id for a in accepted)
    for batch in accepted:
        names = sorted(p.name for p in (store / batch.batch_id).iterdir())
        assert names == sorted(Path(p).name for p in batch.files)
        for rel, digest in batch.files.items():
            assert sha((state / rel).read_bytes()) == digest, rel
    # 5. no image lost: every dropped file is where its decision moved it, byte for byte
    assert sorted(p.name for p in inbox.iterdir()) == [
        n for n in (".accepted", ".rejected") if (inbox / n).exists()]
    for name, files in drops.items():
        moved = inbox / finals[name][0].moved_to  # type: ignore[attr-defined]
        for file, data in files.items():
            raw = data.encode() if isinstance(data, str) else data
            assert (moved / file).read_bytes() == raw, (name, file)
    return {n: type(v[0]).__name__ for n, v in finals.items()}


def interrupted_state(journal: Journal, inbox: Path, state: Path) -> bool:
    """Did a kill leave intake half-way (temp or unjournaled store folder, or a missing move)?"""
    store = state / "batches"
    known = {r["batch_id"] for r in journal.query("SELECT batch_id FROM batches")}
    if store.exists() and any(p.name not in known for p in store.iterdir()):
        return True
    rows = journal.query("SELECT moved_to FROM intakes WHERE moved_to IS NOT NULL")
    return any(not (inbox / r["moved_to"]).exists() for r in rows)


@pytest.mark.parametrize("point", ["copied", "stored", "journaled"])
def test_kill_at_each_step_then_rescan(
    make_env: Callable[..., Env], write_config: Callable[..., Path], point: str
) -> None:
    """A kill at a named point of each flow (accept, duplicate, reject), then a clean scan."""
    env = make_env()
    config_path = write_config()
    drops = {"a-first": batch_files("good", 1), "b-again": batch_files("good", 1),
             "broken": batch_files("bad", 2), "mixed": batch_files("mixed", 3),
             # our report goes beside the user's REJECTED.txt, and recovery still finds it
             "own-report": {**batch_files("bad", 4), "REJECTED.txt": "my own notes"}}
    for name, files in drops.items():
        drop(env.inbox / name, files)
    kills = 0
    for _ in range(len(drops) + 1):
        proc = child(config_path, "once", "--crash-at", point)
        proc.communicate(timeout=60)
        kills += proc.returncode == -signal.SIGKILL
    assert kills >= 2  # the crash points were reached
    env.intake.scan()
    kinds = check_invariants(env.journal, env.inbox, env.state, drops)
    assert kinds == {"a-first": "BatchAccepted", "b-again": "BatchDuplicate",
                     "broken": "BatchRejected", "mixed": "BatchAccepted",
                     "own-report": "BatchRejected"}


def test_random_sigkills_during_intake(
    make_env: Callable[..., Env], write_config: Callable[..., Path]
) -> None:
    """≥ 20 SIGKILLs at random moments while batches keep arriving, then one clean scan."""
    env = make_env()
    config_path = write_config()
    rng = random.Random(4)
    drops: dict[str, dict[str, bytes | str]] = {}
    kinds = ["good", "good", "dup", "bad", "mixed"]
    kills = interrupted = 0
    for round_ in range(24):
        for k in range(2):
            kind = kinds[(2 * round_ + k) % len(kinds)]
            seed = 1 if kind == "dup" else 10 + 2 * round_ + k
            files = batch_files("good" if kind == "dup" else kind, seed, images=8)
            name = f"r{round_:02d}-{k}-{kind}"
            drops[name] = files
            drop(env.inbox / name, files, ready=rng.random() < 0.7)  # others settle (0.5 s)
        proc = child(config_path)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        time.sleep(rng.uniform(0.0, 0.08))  # a scan of two batches takes ~50-100 ms
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        kills += proc.returncode == -signal.SIGKILL
        interrupted += interrupted_state(env.journal, env.inbox, env.state)
    assert kills >= 20
    assert interrupted >= 3, "the kills should land inside intake, not only between batches"
    time.sleep(env.config.inbox.settle_seconds)
    Intake(env.journal, env.config).scan()  # a fresh process-like start: rescan
    found = check_invariants(env.journal, env.inbox, env.state, drops)
    assert sorted(set(found.values())) == ["BatchAccepted", "BatchDuplicate", "BatchRejected"]
