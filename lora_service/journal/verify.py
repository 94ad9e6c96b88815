"""`verify`: prove the journal and the files it points at are what was recorded.

It checks four things and reports each problem precisely:
0. the schema: the triggers that make `events` append-only, unchanged, and the schema version
   (dropping a trigger is raw SQL that leaves every hash valid);
1. the hash chain: seqs contiguous from 1, each prev_hash the previous hash, each hash
   recomputed from the stored event, each payload decodable as its type;
2. the projections: every table rebuilt from the events alone equals the live table;
3. the files: every file an event recorded (and no later event released) exists with its sha256.

A damaged file (bytes over a page, rows written with raw SQL) is a problem in the report, never
an exception: SQLite's `integrity_check`, then whatever each check could not read.

What it does not prove alone: that the newest events were not cut off the end, or rewritten with
recomputed hashes (a chain has no witness of its own); `verify --witness` checks the journal
position that published files carry (`lora_service.versions.witness`). Nor that files the
journal never referenced are sound.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from lora_service.journal import projections
from lora_service.journal.events import decode
from lora_service.journal.sqlite import (
    GENESIS,
    Journal,
    JournalError,
    event_hash,
    load_payload,
    schema_problems,
)
from lora_service.store import sha256_file


@dataclass
class Report:
    events: int = 0
    files: int = 0
    witnesses: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


EVENT_ROWS = "SELECT seq, ts, type, schema, payload, prev_hash, hash FROM events ORDER BY seq"


def rebuild(journal: Journal) -> sqlite3.Connection:
    """Replay every readable event into a fresh in-memory database of projection tables (an
    unreadable one is skipped here and reported by the chain check)."""
    memory = sqlite3.connect(":memory:", isolation_level=None)
    projections.create_tables(memory)
    memory.execute("BEGIN")
    try:
        for seq, ts, type_, _schema, text, _prev, _digest in journal.conn.execute(EVENT_ROWS):
            try:
                event = decode(type_, load_payload(text))
                projections.apply(memory, projections.changes(seq, ts, event))
            except (KeyError, ValueError, ValidationError, OverflowError):
                continue
    except sqlite3.DatabaseError:
        pass  # a damaged page: the chain check names where reading stopped
    memory.execute("COMMIT")
    return memory


def check_chain(journal: Journal, report: Report) -> None:
    prev, expected = GENESIS, 1
    try:
        for seq, ts, type_, schema, text, prev_hash, digest in journal.conn.execute(EVENT_ROWS):
            report.events += 1
            if seq != expected:
                report.problems.append(f"event seq {seq}: expected seq {expected} (events missing)")
            expected = seq + 1
            if prev_hash != prev:
                report.problems.append(f"event seq {seq}: prev_hash does not match event {seq - 1}")
            prev = digest
            try:
                payload = load_payload(text)
            except ValueError as exc:
                report.problems.append(f"event seq {seq}: {exc}")
                continue
            if event_hash(prev_hash, seq, ts, type_, schema, payload) != digest:
                report.problems.append(f"event seq {seq} ({type_}): hash mismatch (event changed)")
            try:
                decode(type_, payload)
            except KeyError:
                report.problems.append(f"event seq {seq}: unknown event type {type_!r}")
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                report.problems.append(f"event seq {seq} ({type_}): bad payload at {where}")
    except sqlite3.DatabaseError as exc:
        report.problems.append(f"events after seq {expected - 1} cannot be read ({exc})")
        return
    position = journal.projected_seq()
    if report.events and position != expected - 1:
        report.problems.append(f"projection position is {position}, journal ends at {expected - 1}")


def check_projections(journal: Journal, rebuilt: sqlite3.Connection, report: Report) -> None:
    for table, (_columns, pk) in projections.TABLES.items():
        live = projections.snapshot(journal.conn, table)
        fresh = projections.snapshot(rebuilt, table)
        if live == fresh:
            continue
        names = [d[1] for d in journal.conn.execute(f"PRAGMA table_info({table})")]
        key_at = [names.index(k) for k in pk]
        live_by = {tuple(r[i] for i in key_at): r for r in live}
        fresh_by = {tuple(r[i] for i in key_at): r for r in fresh}
        for key in sorted(set(live_by) | set(fresh_by), key=repr):
            if live_by.get(key) != fresh_by.get(key):
                shown = key[0] if len(key) == 1 else key
                report.problems.append(
                    f"projection {table} row {shown!r} differs from its rebuild from events"
                )


def check_files(state_dir: Path, rebuilt: sqlite3.Connection, report: Report) -> None:
    for path, sha, seq in rebuilt.execute(
        "SELECT path, sha256, seq FROM files WHERE released = 0 ORDER BY path"
    ):
        report.files += 1
        full = state_dir / path
        if not full.is_file():
            report.problems.append(f"file {path}: missing (recorded by event seq {seq})")
            continue
        try:
            if sha256_file(full) != sha:
                report.problems.append(f"file {path}: sha256 differs from event seq {seq}")
        except OSError as exc:
            report.problems.append(f"file {path}: cannot be read ({exc.strerror})")


def verify(journal: Journal, state_dir: Path) -> Report:
    report = Report()
    try:
        damage = [row[0] for row in journal.conn.execute("PRAGMA integrity_check(20)")]
    except sqlite3.DatabaseError as exc:
        damage = [str(exc)]
    if damage != ["ok"]:
        report.problems.append(f"sqlite integrity_check: {'; '.join(damage)}")
    try:
        report.problems += schema_problems(journal.conn)
    except sqlite3.DatabaseError as exc:
        report.problems.append(f"schema cannot be read ({exc})")
    try:
        check_chain(journal, report)
    except JournalError as exc:  # the position row
        report.problems.append(str(exc))
    rebuilt = rebuild(journal)
    try:
        try:
            check_projections(journal, rebuilt, report)
        except sqlite3.DatabaseError as exc:
            report.problems.append(f"projection tables cannot be read ({exc})")
        check_files(state_dir, rebuilt, report)
    finally:
        rebuilt.close()
    return report
