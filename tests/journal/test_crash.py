"""SQLite's own crash-test method: kill an appender at random moments, then check what survives.

The child acknowledges a seq only after `append` returned (the commit is durable); every
acknowledged event must be there afterwards, the database must pass integrity_check, and
`verify` (chain, projections) must pass. Partial events would break the hash chain.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_service.journal import Journal
from lora_service.journal.verify import verify

APPENDER = Path(__file__).with_name("appender.py")
KILLS = int(os.environ.get("JOURNAL_KILLS", "50"))


def _kill_one(state: Path, rng: random.Random) -> list[int]:
    proc = subprocess.Popen(
        [sys.executable, str(APPENDER), str(state), "100000", "k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the child is up and appending
    time.sleep(rng.uniform(0, 0.03))
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return [int(line) for line in (first + rest).split()]


@pytest.mark.parametrize("seed", [1])
def test_sigkill_at_random_moments_loses_no_acknowledged_event(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    acknowledged: list[int] = []
    for _ in range(KILLS):
        acknowledged += _kill_one(tmp_path, rng)
        raw = sqlite3.connect(tmp_path / "journal.sqlite")
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        present = {row[0] for row in raw.execute("SELECT seq FROM events")}
        raw.close()
        assert set(acknowledged) <= present
        with Journal.for_state(tmp_path, check=True) as journal:
            report = verify(journal, tmp_path)
        assert report.ok, report.problems
    assert report.events >= len(acknowledged) >= KILLS
