"""The SQLite journal: the only writer of `state/journal.sqlite`.

Durability and concurrency choices, each for a reason:
- WAL and `synchronous=FULL`: a commit that returned survives power loss, not only a crash.
- Autocommit connection plus explicit `BEGIN IMMEDIATE` around read-last-hash + insert: the
  daemon, its training child and CLI commands append from different processes; a deferred
  transaction that upgrades to a writer can fail with SQLITE_BUSY_SNAPSHOT, which no busy
  timeout fixes, while an immediate one simply waits for the write lock.
- Projections are applied in the event's own transaction, so they are never behind or ahead.
- Triggers refuse UPDATE and DELETE on `events`: the table is append-only even to raw SQL.
- A connection belongs to the process that opened it (never shared across fork).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from lora_service.errors import ServiceError
from lora_service.journal import projections
from lora_service.journal.events import Event, decode

GENESIS = "0" * 64
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0


class JournalError(ServiceError):
    """The journal cannot be opened or written (corrupt file, locked for too long, disk full)."""


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    ts: str
    type: str
    schema: int
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    @property
    def event(self) -> Event:
        return decode(self.type, self.payload)

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "type": self.type,
            "schema": self.schema,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def event_hash(prev_hash: str, seq: int, ts: str, type_: str, schema: int, payload: Any) -> str:
    """sha256 over the previous hash and the canonical JSON of the event."""
    body = projections.canonical(
        {"seq": seq, "ts": ts, "type": type_, "schema": schema, "payload": payload}
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_EVENTS_DDL = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        type TEXT NOT NULL,
        schema INTEGER NOT NULL,
        payload TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE)""",
    """CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'journal events are append-only: UPDATE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'journal events are append-only: DELETE refused'); END""",
    "CREATE TABLE IF NOT EXISTS position (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER)",
)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """An autocommit connection with the journal's pragmas (transactions are explicit)."""
    if readonly:
        uri = f"file:{path}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                               check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


class Journal:
    """Append events, read them back, query projections. One object per thread that writes
    (the daemon's main loop and its intake thread each have one); SQLite serialises them."""

    def __init__(self, path: Path, *, check: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        try:
            self.conn = connect(self.path)
            if check:
                result = self.conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise JournalError(f"{self.path}: integrity check failed: {result}")
            self._create()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.path}: cannot open journal ({exc})") from None
        self.db = sqlite_utils.Database(self.conn)

    @classmethod
    def for_state(cls, state_dir: Path, *, check: bool = False) -> Journal:
        return cls(Path(state_dir) / "journal.sqlite", check=check)

    def _create(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _EVENTS_DDL:
                self.conn.execute(statement)
            projections.create_tables(self.conn)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    # -- writing -----------------------------------------------------------------------------

    def append(self, *events: Event) -> list[int]:
        """Append events in one transaction (all or none) and return their seqs."""
        if os.getpid() != self._pid:
            raise JournalError("a journal connection cannot be used across fork; open a new one")
        if not events:
            return []
        with self._lock:
            try:
                return self._append(events)
            except sqlite3.OperationalError as exc:
                raise JournalError(f"{self.path}: append failed ({exc})") from None

    def _append(self, events: tuple[Event, ...]) -> list[int]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = row if row else (0, GENESIS)
            seqs = []
            for event in events:
                seq += 1
                ts = utc_now()
                type_ = event.type_name()
                payload = event.payload()
                digest = event_hash(prev, seq, ts, type_, event.SCHEMA, payload)
                conn.execute(
                    "INSERT INTO events (seq, ts, type, schema, payload, prev_hash, hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, ts, type_, event.SCHEMA, projections.canonical(payload), prev, digest),
                )
                projections.apply(conn, projections.changes(seq, ts, event))
                prev = digest
                seqs.append(seq)
            conn.execute("INSERT OR REPLACE INTO position (id, seq) VALUES (1, ?)", (seq,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return seqs

    # -- reading -----------------------------------------------------------------------------

    def last_seq(self) -> int:
        row = self.conn.execute("SELECT max(seq) FROM events").fetchone()
        return row[0] or 0

    def events(self, since: int = 0, types: tuple[str, ...] = ()) -> Iterator[StoredEvent]:
        """Events with seq > since, in order."""
        sql = "SELECT seq, ts, type, schema, payload, prev_hash, hash FROM events WHERE seq > ?"
        params: list[Any] = [since]
        if types:
            sql += f" AND type IN ({', '.join('?' for _ in types)})"
            params += types
        for seq, ts, type_, schema, payload, prev, digest in self.conn.execute(
            sql + " ORDER BY seq", params
        ):
            yield StoredEvent(seq, ts, type_, schema, json.loads(payload), prev, digest)

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

