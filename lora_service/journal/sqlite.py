"""The SQLite journal: the only writer of `state/journal.sqlite`.

Durability and concurrency choices, each for a reason:
- WAL and `synchronous=FULL`: a commit that returned survives power loss, not only a crash.
- Autocommit connection plus explicit `BEGIN IMMEDIATE` around read-last-hash + insert: the
  daemon, its training child and CLI commands append from different processes; a deferred
  transaction that upgrades to a writer can fail with SQLITE_BUSY_SNAPSHOT, which no busy
  timeout fixes, while an immediate one simply waits for the write lock.
- Projections are applied in the event's own transaction, so they are never behind or ahead.
- Triggers refuse UPDATE and DELETE on `events`, and any INSERT that is not the next seq with a
  new hash (`INSERT OR REPLACE` deletes the row it replaces without firing DELETE triggers): the
  table is append-only even to raw SQL. Schema 2 added the INSERT trigger; a writer that opens a
  schema 1 journal installs it, a reader never writes. Raw SQL can drop a trigger too, leaving
  every hash valid: `verify` checks the triggers' SQL and the schema version (`schema_problems`).
- Readers open `mode=ro`: they never create the state folder or the journal, never migrate,
  never write a byte of it. SQLite reads a WAL journal through its own companion files,
  `journal.sqlite-wal` and `-shm` (the log and its index, no state of ours): in a writable
  folder it creates them when missing and, a reader being unable to checkpoint, leaves them
  after close (the WAL empty); the next writer uses and removes them (run as root, SQLite gives
  them the journal's owner). A folder the reader cannot write (a read-only mount, a copy) cannot
  get them, and `mode=ro` alone fails there ("unable to open database file"):
  - no `-wal`: opened `immutable=1`, exact: every committed event is in the main file;
  - a `-wal` but no `-shm` (copied while the daemon ran): opened on the lock-free `unix-none`
    VFS in `locking_mode=EXCLUSIVE`, where SQLite keeps the WAL index in private memory instead
    of `-shm`: exact, the committed WAL content is read (`immutable=1` would silently skip it).
  Both assume nobody writes the journal while it is read that way, true of a mount or a copy
  nobody can write; a daemon that another user starts on that folder meanwhile goes unseen, or
  (with a `-wal`) can make the read fail as damage: run it again.
- A connection belongs to the process that opened it (never shared across fork).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import sqlite_utils

from lora_service.errors import ServiceError
from lora_service.journal import projections
from lora_service.journal.events import Event, decode

GENESIS = "0" * 64
# 1: events, projections, UPDATE/DELETE triggers; 2: the INSERT trigger; 3: indexes on
# loss_points and checkpoints (`_PROJECTION_INDEXES`)
SCHEMA_VERSION = 3
BUSY_TIMEOUT_S = 60.0
INT64 = range(-(2**63), 2**63)  # what an SQLite INTEGER holds

Mode = Literal["create", "write", "read"]


class JournalError(ServiceError):
    """The journal cannot be opened, read or written (damaged file, locked too long, disk full)."""


# what a journal call may raise when its file or disk fails (most arrive as JournalError)
FAULTS: tuple[type[Exception], ...] = (JournalError, sqlite3.Error)


class StaleDecision(JournalError):
    """A decision read the journal at a position it has since moved past (see `Expect`): the
    caller re-reads and decides again."""


# the events a decision about the head depends on: which version is the head, which versions
# exist, which batches are pending
HEAD_EVENTS = ("HeadMoved", "VersionCreated", "VersionImported", "BatchRequeued")


@dataclass(frozen=True)
class Expect:
    """Where a decision was read: `append(..., expect=Expect(seq))` refuses (StaleDecision,
    nothing appended) when an event of `types` was appended after `seq` — the optimistic
    concurrency of the eventsourcing library's recorders, for the head's stream. Other events
    (losses, intake) may land meanwhile; they change nothing such a decision read."""

    seq: int
    types: tuple[str, ...] = HEAD_EVENTS


class NoJournal(JournalError):
    """No journal where the config points, or a read-only one asked to write: the command
    cannot start and nothing was changed, so exit 2 (bad input), like a wrong path."""

    exit_code = 2


def load_payload(text: str) -> dict[str, Any]:
    """A stored payload, refusing what `append` never writes: text that is not JSON, and integers
    SQLite cannot hold (rebuilding their projection would overflow). ValueError says which."""
    try:
        payload = json.loads(text, parse_int=_int64)
    except json.JSONDecodeError as exc:
        raise ValueError(f"payload is not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"payload is not a JSON object ({type(payload).__name__})")
    return payload


def _int64(digits: str) -> int:
    value = int(digits)
    if value not in INT64:
        raise ValueError(f"payload integer {digits[:30]} is outside SQLite's 64-bit range")
    return value


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
    """CREATE TRIGGER IF NOT EXISTS events_append_only BEFORE INSERT ON events
    WHEN NEW.seq IS NOT (SELECT coalesce(max(seq), 0) + 1 FROM events)
      OR EXISTS (SELECT 1 FROM events WHERE hash = NEW.hash)
    BEGIN
      SELECT RAISE(ABORT, 'journal events are append-only: INSERT must be the next seq, new hash');
    END""",
    "CREATE TABLE IF NOT EXISTS position (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER)",
)

# Indexes on projection tables are only speed: a journal without one (schema 2, until a writer
# opens it) answers the same, slower, so they are not part of `schema_problems`.
LOSS_INDEX = "loss_points_by_run"
_PROJECTION_INDEXES = (
    # `queries.loss_curve`: a run's points by step, with the loss, without reading the table
    f"CREATE INDEX IF NOT EXISTS {LOSS_INDEX} ON loss_points (run_id, step, loss)",
    # a checkpoint releases the previous one by path: without it, a scan per CheckpointSaved
    "CREATE INDEX IF NOT EXISTS checkpoints_by_path ON checkpoints (path)",
)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """An autocommit connection with the journal's pragmas (transactions are explicit)."""
    exclusive = False
    if readonly:
        flags = "mode=ro"
        if not os.access(path.parent, os.W_OK):
            if not path.with_name(path.name + "-wal").exists():
                flags += "&immutable=1"
            elif not path.with_name(path.name + "-shm").exists():
                flags += "&vfs=unix-none"
                exclusive = True
        conn = sqlite3.connect(f"file:{quote(str(path))}?{flags}", uri=True, isolation_level=None,
                               timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                               check_same_thread=False)
    try:
        if exclusive:  # before the first read: the WAL index then lives in this process's heap
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not readonly:
            _enter_wal(conn)
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def _enter_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, waiting out another process that is doing the same. Changing the journal
    mode of a file another connection has just created can answer "locked" at once, without the
    busy handler (SQLite's deadlock avoidance), so the wait is ours."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _expected_schema() -> dict[tuple[str, str], str]:
    """(type, name) -> SQL, as SQLite stores `_EVENTS_DDL` (it drops `IF NOT EXISTS`)."""
    memory = sqlite3.connect(":memory:")
    try:
        for statement in _EVENTS_DDL:
            memory.execute(statement)
        rows = memory.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL")
        return {(type_, name): sql for type_, name, sql in rows}
    finally:
        memory.close()


def schema_problems(conn: sqlite3.Connection) -> list[str]:
    """What differs from the schema that makes `events` append-only: its tables and triggers,
    each with the SQL lora-service creates, no other trigger, and user_version. Raw SQL can drop
    a trigger and leave every hash valid, so the chain check alone never notices.
    sqlite3.DatabaseError when the schema cannot be read."""
    live = {(type_, name): (table, sql) for type_, name, table, sql in conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE type IN ('table', 'trigger')"
    )}
    expected = _expected_schema()
    problems = []
    for (type_, name), sql in expected.items():
        if (type_, name) not in live:
            problems.append(f"schema: {type_} {name} is missing" + (
                " (raw SQL can change events)" if type_ == "trigger" else ""))
        elif live[type_, name][1] != sql:
            problems.append(f"schema: {type_} {name} is not the one lora-service creates")
    for (type_, name), (table, _sql) in sorted(live.items()):
        if type_ == "trigger" and (type_, name) not in expected:
            problems.append(f"schema: unexpected trigger {name!r} on {table!r}")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        problems.append(f"schema: version {version}, expected {SCHEMA_VERSION} (the daemon "
                        "upgrades an older journal when it starts)")
    return problems


class Journal:
    """Append events, read them back, query projections. One object per thread that writes
    (the daemon's main loop and its intake thread each have one); SQLite serialises them.

    `mode`: "create" (the daemon and training: make the state folder and journal if missing),
    "write" (an existing journal, e.g. `requeue`), "read" (an existing journal, never written:
    works on a read-only state). Without a journal, "write" and "read" raise NoJournal."""

    def __init__(self, path: Path, *, check: bool = False, mode: Mode = "create") -> None:
        self.path = Path(path)
        self.readonly = mode == "read"
        self._pid = os.getpid()
        self._lock = threading.Lock()
        state = self.path.parent
        if mode == "create":
            try:
                state.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                why = "not a folder" if state.exists() else exc.strerror
                raise NoJournal(f"{state}: cannot create the state folder ({why})") from None
        elif not self.path.is_file():
            raise NoJournal(f"no state at {state} (no journal.sqlite; the daemon creates it)")
        if not self.readonly and not (
            os.access(state, os.W_OK) and (not self.path.exists() or os.access(self.path, os.W_OK))
        ):
            raise NoJournal(f"{state}: the state is read-only; this command writes the journal")
        try:
            self.conn = connect(self.path, readonly=self.readonly)
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.path}: cannot open journal ({exc})") from None
        try:
            if check:
                result = self.conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise JournalError(f"{self.path}: integrity check failed: {result}")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if self.readonly and version == 0:
                if not self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise NoJournal(f"no state at {state} (journal.sqlite is empty: the daemon "
                                    "is creating it)")
                raise JournalError(f"{self.path}: not a lora-service journal (schema version 0)")
            if not self.readonly and version < SCHEMA_VERSION:
                self._create()
        except BaseException as exc:
            self.conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise JournalError(f"{self.path}: cannot open journal ({exc})") from None
            raise
        self.db = sqlite_utils.Database(self.conn)

    @classmethod
    def for_state(cls, state_dir: Path, *, check: bool = False, mode: Mode = "create") -> Journal:
        return cls(Path(state_dir) / "journal.sqlite", check=check, mode=mode)

    def _create(self) -> None:
        """Create the tables, or migrate an older journal (every statement is idempotent)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _EVENTS_DDL:
                self.conn.execute(statement)
            projections.create_tables(self.conn)
            for statement in _PROJECTION_INDEXES:
                self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    # -- writing -----------------------------------------------------------------------------

    def append(self, *events: Event, expect: Expect | None = None) -> list[int]:
        """Append events in one transaction (all or none) and return their seqs; with `expect`,
        only if no event of `expect.types` came after `expect.seq` (else StaleDecision)."""
        if os.getpid() != self._pid:
            raise JournalError("a journal connection cannot be used across fork; open a new one")
        if self.readonly:
            raise JournalError(f"{self.path}: opened read-only; cannot append")
        if not events:
            return []
        with self._lock:
            try:
                return self._append(events, expect)
            except (sqlite3.DatabaseError, ValueError) as exc:
                raise JournalError(f"{self.path}: append failed ({exc})") from None

    def _append(self, events: tuple[Event, ...], expect: Expect | None) -> list[int]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            seq, prev = self._position()
            if expect is not None and seq > expect.seq:
                marks = ", ".join("?" for _ in expect.types)
                moved = conn.execute(
                    f"SELECT seq, type FROM events WHERE seq > ? AND type IN ({marks})"
                    " ORDER BY seq LIMIT 1", (expect.seq, *expect.types)).fetchone()
                if moved is not None:
                    raise StaleDecision(f"{self.path}: decided at seq {expect.seq}, but "
                                        f"{moved[1]} was appended at seq {moved[0]}")
            seqs = []
            for event in events:
                seq += 1
                ts = utc_now()
                type_ = event.type_name()
                payload = event.payload()
                text = projections.canonical(payload)
                load_payload(text)  # never store what reading refuses
                digest = event_hash(prev, seq, ts, type_, event.SCHEMA, payload)
                conn.execute(
                    "INSERT INTO events (seq, ts, type, schema, payload, prev_hash, hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, ts, type_, event.SCHEMA, text, prev, digest),
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
    # A damaged file (bytes over a page, a row written with raw SQL) is a JournalError naming
    # the journal and what SQLite or the payload check said, never a traceback.

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"{self.path}: cannot read the journal ({exc}); `lora-service verify` says more"
            ) from None

    def _position(self) -> tuple[int, str]:
        row = self.conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def position(self) -> tuple[int, str]:
        """(seq, hash) of the last event; (0, GENESIS) for an empty journal."""
        with self._reading():
            return self._position()

    def last_seq(self) -> int:
        return self.position()[0]

    def hash_at(self, seq: int) -> str | None:
        """The hash of event `seq` (GENESIS for 0), None when the journal has no such event."""
        if seq == 0:
            return GENESIS
        if seq not in INT64:
            return None
        with self._reading():
            row = self.conn.execute("SELECT hash FROM events WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row else None

    def projected_seq(self) -> int | None:
        """The seq the projection tables are at; equal to `last_seq` unless raw SQL wrote."""
        with self._reading():
            row = self.conn.execute("SELECT seq FROM position WHERE id = 1").fetchone()
        return row[0] if row else None

    def events(self, since: int = 0, types: tuple[str, ...] = ()) -> Iterator[StoredEvent]:
        """Events with seq > since, in order."""
        sql = "SELECT seq, ts, type, schema, payload, prev_hash, hash FROM events WHERE seq > ?"
        params: list[Any] = [since]
        if types:
            sql += f" AND type IN ({', '.join('?' for _ in types)})"
            params += types
        with self._reading():
            for seq, ts, type_, schema, text, prev, digest in self.conn.execute(
                sql + " ORDER BY seq", params
            ):
                try:
                    payload = load_payload(text)
                except ValueError as exc:
                    raise JournalError(f"{self.path}: event seq {seq}: {exc}") from None
                yield StoredEvent(seq, ts, type_, schema, payload, prev, digest)

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self._reading():
            return list(self.db.query(sql, params))

    def iter_query(self, sql: str, params: Any = ()) -> Iterator[dict[str, Any]]:
        """`query` a row at a time, for answers too long to hold (a million loss points)."""
        with self._reading():
            yield from self.db.query(sql, params)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

