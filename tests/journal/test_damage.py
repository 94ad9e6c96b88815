"""A damaged journal is reported, never a traceback; raw SQL cannot replace an event.

Damage is made the ways it happens: random bytes over a page of the file, and rows written
with raw SQL around `Journal.append` (a payload that is not JSON, an integer SQLite cannot
hold). `verify`, `status` and `events` each name what is wrong and exit 1.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_service.journal import Journal
from lora_service.journal import events as ev
from lora_service.journal.sqlite import SCHEMA_VERSION, event_hash


def lora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lora_service", *args],
                          capture_output=True, text=True, timeout=120)


def _state_with_events(state: Path) -> None:
    with Journal.for_state(state) as journal:
        journal.append(*(ev.BatchDetected(name=f"b{i}") for i in range(3)))
        journal.append(ev.LossLogged(run_id="r1", step=1, loss=0.5, lr=1e-4))


def _raw_append(state: Path, type_: str, text: str, payload: object) -> None:
    """Append a row the way raw SQL would, with a correct hash (only the payload is bad)."""
    raw = sqlite3.connect(state / "journal.sqlite")
    seq, prev = raw.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    ts = "2025-01-01T00:00:00.000000Z"
    digest = event_hash(prev, seq + 1, ts, type_, 1, payload)
    raw.execute("INSERT INTO events VALUES (?, ?, ?, 1, ?, ?, ?)",
                (seq + 1, ts, type_, text, prev, digest))
    raw.commit()
    raw.close()


def _not_json(state: Path) -> str:
    _raw_append(state, "BatchDetected", "{not json", {})
    return "seq 5: payload is not JSON"


def _huge_integer(state: Path) -> str:
    payload = {"run_id": "r1", "step": 2**70, "loss": 0.5, "lr": 1e-4}
    _raw_append(state, "LossLogged", json.dumps(payload), payload)
    return "seq 5: payload integer 1180591620717411303424 is outside SQLite's 64-bit range"


def _bytes_over_a_page(state: Path) -> str:
    """Random bytes over the root page of `events` (every read of events passes through it)."""
    path = state / "journal.sqlite"
    raw = sqlite3.connect(path)
    page_size = raw.execute("PRAGMA page_size").fetchone()[0]
    root = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'events'").fetchone()[0]
    raw.close()
    assert not path.with_name("journal.sqlite-wal").exists()  # all of it is in the main file
    with open(path, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(random.Random(12).randbytes(page_size))
    return "malformed"


DAMAGE: dict[str, Callable[[Path], str]] = {
    "bytes over a page": _bytes_over_a_page,
    "payload not JSON": _not_json,
    "integer too large": _huge_integer,
}


@pytest.mark.parametrize("command", ["verify", "status", "events"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_journal_is_reported_with_exit_1_and_no_traceback(
    write_config: Callable[..., Path], tmp_path: Path, damage: str, command: str
) -> None:
    """Item 13: each read command on each kind of damage says what is wrong and exits 1."""
    config = write_config()
    state = tmp_path / "state"
    _state_with_events(state)
    says = DAMAGE[damage](state)
    result = lora(command, "--config", str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert says in output, output
    if command != "verify":
        assert result.stderr.count("\n") == 1 and str(state / "journal.sqlite") in result.stderr


def test_status_sees_a_row_written_around_the_journal(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Item 13: a well-formed event that raw SQL added is in no projection; status says so."""
    config = write_config()
    state = tmp_path / "state"
    _state_with_events(state)
    _raw_append(state, "BatchDetected", '{"name": "raw"}', {"name": "raw"})
    result = lora("status", "--config", str(config))
    assert result.returncode == 1 and "journal:   seq 5" in result.stdout
    assert result.stderr == (
        "lora-service: journal: events end at seq 5 but the projections are at seq 4 (rows "
        "written around the journal; `lora-service verify` says more)\n"
    )


def test_verify_lists_every_problem_of_a_damaged_page(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config()
    state = tmp_path / "state"
    _state_with_events(state)
    _bytes_over_a_page(state)
    result = lora("verify", "--json", "--config", str(config))
    assert result.returncode == 1
    problems = json.loads(result.stdout)["problems"]
    assert problems[0].startswith("sqlite integrity_check: ")
    assert any(p.startswith("events after seq 0 cannot be read (") for p in problems), problems


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT OR REPLACE INTO events VALUES (2, 'ts', 'BatchDetected', 1, '{\"name\": \"x\"}',"
        " 'p', 'h')",
        "REPLACE INTO events SELECT 2, ts, type, schema, payload, prev_hash, 'h' FROM events"
        " WHERE seq = 2",
        # a new seq whose hash collides with event 2: REPLACE would drop event 2 silently
        "INSERT OR REPLACE INTO events SELECT 5, ts, type, schema, payload, prev_hash, hash"
        " FROM events WHERE seq = 2",
        "INSERT INTO events VALUES (1, 'ts', 'BatchDetected', 1, '{}', 'p', 'h')"
        " ON CONFLICT (seq) DO NOTHING",
        "INSERT INTO events VALUES (9, 'ts', 'BatchDetected', 1, '{}', 'p', 'h')",  # a gap
    ],
)
def test_raw_insert_cannot_replace_or_skip_an_event(tmp_path: Path, sql: str) -> None:
    """Item 14: REPLACE deletes the old row without firing DELETE triggers; the INSERT trigger
    refuses anything but the next seq with a new hash, whatever the conflict clause."""
    _state_with_events(tmp_path)
    raw = sqlite3.connect(tmp_path / "journal.sqlite")
    before = raw.execute("SELECT * FROM events ORDER BY seq").fetchall()
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute(sql)
    raw.commit()
    assert raw.execute("SELECT * FROM events ORDER BY seq").fetchall() == before
    raw.close()
    with Journal.for_state(tmp_path) as journal:
        assert journal.append(ev.BatchDetected(name="next")) == [5]  # appends still work


def test_a_schema_1_journal_gets_the_insert_trigger_from_a_writer_not_a_reader(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Item 14: a journal written by the previous release (schema 1: no INSERT trigger) is
    migrated by the first writer that opens it; a read command leaves the file as it is."""
    config = write_config()
    state = tmp_path / "state"
    _state_with_events(state)
    raw = sqlite3.connect(state / "journal.sqlite")
    raw.execute("DROP TRIGGER IF EXISTS events_append_only")  # exactly schema 1's layout
    raw.execute("PRAGMA user_version = 1")
    raw.close()
    before = (state / "journal.sqlite").read_bytes()

    assert lora("events", "--config", str(config)).returncode == 0
    assert (state / "journal.sqlite").read_bytes() == before

    Journal.for_state(state).close()
    raw = sqlite3.connect(state / "journal.sqlite")
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("INSERT OR REPLACE INTO events SELECT seq, ts, type, schema, '{}', prev_hash,"
                    " 'h' FROM events WHERE seq = 1")
    raw.close()
