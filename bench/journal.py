"""Journal appends/s against a bare sqlite3 INSERT loop with the same pragmas, in one run.

Both sides commit one event per transaction (BEGIN IMMEDIATE ... COMMIT) with WAL and
synchronous=FULL, so the ratio shows what hashing, pydantic and projections cost on top of
SQLite's own durable commit. Goal: >= 0.5.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from lora_service.journal import Journal
from lora_service.journal import events as ev

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000


def bare(path: Path) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, ts TEXT, type TEXT, schema INT,"
                 " payload TEXT, prev_hash TEXT, hash TEXT)")
    payload = '{"loss":0.5,"lr":0.0001,"run_id":"r1","step":1}'
    start = time.perf_counter()
    for i in range(N):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (i + 1, "2026-01-01T00:00:00Z", "LossLogged", 1, payload, "0" * 64, str(i)))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return N / elapsed


def ours(path: Path) -> float:
    journal = Journal(path)
    start = time.perf_counter()
    for i in range(N):
        journal.append(ev.LossLogged(run_id="r1", step=i, loss=0.5, lr=1e-4))
    elapsed = time.perf_counter() - start
    journal.close()
    return N / elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        reference = bare(Path(tmp) / "bare.sqlite")
        measured = ours(Path(tmp) / "journal.sqlite")
    print(f"journal: {measured:,.0f} appends/s; bare sqlite3 INSERT: {reference:,.0f}/s; "
          f"ratio {measured / reference:.2f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
