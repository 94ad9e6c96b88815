"""A batch folder swapped for a symlink to an outside folder while intake reads it
(`renameat2(RENAME_EXCHANGE)` in a loop, from a racer thread): not one byte of the outside
folder may reach the store or the journal, and nothing is written into it."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from lora_service.journal import events as ev

from .conftest import Env, drop, image_bytes, sha

TRIALS = 60
RENAME_EXCHANGE = 2
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (whatever they are: a folder and a symlink here)."""
    return _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b),
                           RENAME_EXCHANGE) == 0


class Racer(threading.Thread):
    """Swaps `a` and `b` until stopped; counts the swaps made while `window` is set."""

    def __init__(self, a: Path, b: Path, window: threading.Event) -> None:
        super().__init__(daemon=True)
        self.a, self.b, self.window = a, b, window
        self.done = threading.Event()
        self.swaps = self.in_window = 0

    def run(self) -> None:
        while not self.done.is_set():
            if exchange(self.a, self.b):
                self.swaps += 1
                self.in_window += self.window.is_set()

    def stop(self) -> None:
        self.done.set()
        self.join()


def test_swapping_the_batch_folder_for_a_symlink_never_reads_outside(
    env: Env, tmp_path: Path
) -> None:
    outside = drop(tmp_path / "outside", {
        **{f"img{i}.png": image_bytes(i, size=40) for i in range(3)},  # no inside image is 40 px
        **{f"img{i}.txt": f"OUTSIDE secret {i}" for i in range(3)},
        "metadata.csv": "file_name,text\nimg0.png,OUTSIDE csv\n",
    })
    outside_files = {p.name: p.read_bytes() for p in outside.iterdir()}
    outside_shas = {sha(data) for data in outside_files.values()}
    lair = tmp_path / "lair"  # the attacker's symlinks live outside the inbox
    lair.mkdir()
    window = threading.Event()
    swaps = in_window = 0
    for trial in range(TRIALS):
        batch = drop(env.inbox / f"t{trial:03d}", {
            **{f"img{i}.png": image_bytes(trial * 10 + i) for i in range(3)},
            **{f"img{i}.txt": f"inside {trial} {i}" for i in range(3)},
        })
        link = lair / f"link{trial:03d}"
        link.symlink_to(outside)
        racer = Racer(batch, link, window)
        racer.start()
        window.set()
        try:
            env.intake.scan()
        finally:
            window.clear()
            racer.stop()
        swaps += racer.swaps
        in_window += racer.in_window
    for _ in range(3):  # whatever a racer left behind is decided without one
        env.intake.scan()
    print(f"{TRIALS} trials, {swaps} swaps, {in_window} inside the intake window")

    assert in_window >= TRIALS, "the racer should land swaps inside intake"
    stored = [p for p in (env.state / "batches").rglob("*") if p.is_file()]
    assert stored, "some batches must have been accepted"
    for path in stored:
        data = path.read_bytes()
        assert sha(data) not in outside_shas, path
        assert b"OUTSIDE" not in data, path
    for row in env.journal.query("SELECT payload FROM events"):
        assert "OUTSIDE" not in row["payload"]
        assert not any(digest in row["payload"] for digest in outside_shas)
    accepted = [e for e in env.events("BatchAccepted") if isinstance(e, ev.BatchAccepted)]
    assert accepted and all(i.caption.startswith("inside") for a in accepted for i in a.images)
    # nothing was written into the outside folder, nothing of it moved
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == outside_files
