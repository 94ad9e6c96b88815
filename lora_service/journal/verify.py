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

It streams, so memory stays bounded whatever the journal's length (issue 14: at 1M events the
rebuild and both sides of every table held in memory took 740 MB, and 38 s):
- the events are read in seq order through cursors inside one read transaction (so a daemon
  appending meanwhile is not seen and nothing differs spuriously);
- the chain is checked row by row, each hash computed from the stored payload text (the bytes
  `append` hashed) and only a mismatch parsed, to check it the exact way;
- each event is decoded (pydantic parses the stored JSON itself) and its projection changes
  (`projections.changes`, the live journal's own function) are replayed into a temporary
  on-disk database, `CHUNK` events at a time: per table in order, consecutive identical
  statements as one `executemany`, an UPDATE that the next one on its table overwrites
  dropped (`_Statements`);
- SQLite's `integrity_check` runs meanwhile on a connection of its own, in a thread (SQLite
  releases the GIL), and the files are hashed in another while the tables are compared (it
  also checks that each index holds exactly its table's rows: 3.5 µs an event, a quarter of
  verify's CPU at 1M events, kept because `verify` is the audit);
- the rebuild is attached to the journal's connection and each table is compared inside SQLite
  (row counts and a join on the primary key); only a table that differs is searched for the
  rows to name, at most `ROWS_NAMED` of them.
A journal of `PARALLEL_FROM` events or more is decoded in a second process, which sends each
chunk's statements to this one while this one checks the chain and applies them: the two
halves take about as long, so two cores take half the time. Problems are reported in the
order of a single pass: by seq, then in the order the checks run on an event.

What it does not prove alone: that the newest events were not cut off the end, or rewritten with
recomputed hashes (a chain has no witness of its own); `verify --witness` checks the journal
position that published files carry (`lora_service.versions.witness`). Nor that files the
journal never referenced are sound.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lora_service.journal import projections
from lora_service.journal.events import EVENT_TYPES, decode
from lora_service.journal.sqlite import (
    GENESIS,
    Journal,
    JournalError,
    connect,
    event_hash,
    load_payload,
    schema_problems,
)
from lora_service.store import sha256_file

CHUNK = 2000  # events decoded, and their projection changes applied, at a time
ROWS_NAMED = 100  # differing rows named per projection table; the rest are counted
PARALLEL_FROM = 50_000  # events: a shorter journal is decoded in this process
EVENT_ROWS = "SELECT seq, ts, type, schema, payload, prev_hash, hash FROM events"
# EVENT_ROWS as `_decode` reads them in a second process: not the two hashes it does not use
DECODED_ROWS = "SELECT seq, ts, type, schema, payload, NULL, NULL FROM events"

# problems of one event, in the order they are reported
GAP, LINK, PAYLOAD, HASH, TYPE = range(5)


@dataclass
class Report:
    events: int = 0
    files: int = 0
    witnesses: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _digit_map() -> bytes:
    """bytes.translate table: every ASCII digit to "0", every other byte to " "."""
    table = bytearray(b" " * 256)
    for digit in b"0123456789":
        table[digit] = ord("0")
    return bytes(table)


_DIGITS = _digit_map()
# a JSON integer outside SQLite's 64 bits has 19 digits in a row; `load_payload` decides
_LONG_RUN = b"0" * 19


def hash_of_text(prev_hash: str, seq: int, ts: str, type_: str, schema: int, text: str) -> str:
    """`event_hash` from the stored payload text, without parsing it: the string hashed is the
    same whenever the text is the canonical JSON `append` stores. (A text that hashes right
    here but is not canonical was hashed by someone else than `append`: like any tail rewritten
    with recomputed hashes, only a witness can tell.)"""
    body = (f'{prev_hash}{{"payload":{text},"schema":{schema},"seq":{seq},'
            f'"ts":{encode_basestring(ts)},"type":{encode_basestring(type_)}}}')
    return hashlib.sha256(body.encode()).hexdigest()


# -- the chain -------------------------------------------------------------------------------


class _Chain:
    """The chain checks of rows (EVENT_ROWS) in seq order; problems as (seq, order, text)."""

    def __init__(self) -> None:
        self.prev, self.expected, self.read = GENESIS, 1, 0
        self.problems: list[tuple[int, int, str]] = []

    def run(self, rows: Iterable[tuple[Any, ...]], until: int | None = None) -> None:
        """Check `rows`, up to and including the first whose seq is `until` or more."""
        prev, expected, read = self.prev, self.expected, 0
        problems, sha256, string = self.problems, hashlib.sha256, encode_basestring
        try:
            for seq, ts, type_, schema, text, prev_hash, digest in rows:
                read += 1
                if seq != expected:
                    problems.append(
                        (seq, GAP, f"event seq {seq}: expected seq {expected} (events missing)"))
                expected = seq + 1
                if prev_hash != prev:
                    problems.append(
                        (seq, LINK, f"event seq {seq}: prev_hash does not match event {seq - 1}"))
                prev = digest
                try:  # `event_hash`, from the stored text (see `hash_of_text`)
                    hashed = sha256(
                        f'{prev_hash}{{"payload":{text},"schema":{schema},"seq":{seq},'
                        f'"ts":{string(ts)},"type":{string(type_)}}}'.encode()
                    ).hexdigest() == digest
                except TypeError:  # a column that raw SQL gave another type
                    hashed = False
                if not hashed:
                    self._exact(seq, ts, type_, schema, text, prev_hash, digest)
                if until is not None and seq >= until:
                    break
        finally:
            self.prev, self.expected, self.read = prev, expected, self.read + read

    def _exact(self, seq: int, ts: str, type_: str, schema: int, text: str, prev_hash: str,
               digest: str) -> None:
        try:
            payload = load_payload(text)
        except (TypeError, ValueError):
            return  # the decoding reports it, and an unreadable payload has no hash to check
        if event_hash(prev_hash, seq, ts, type_, schema, payload) != digest:
            self.problems.append(
                (seq, HASH, f"event seq {seq} ({type_}): hash mismatch (event changed)"))


# -- decoding and the projection statements --------------------------------------------------


class _Recorder:
    """Stands in for a connection to learn the SQL `projections.apply` runs for a change."""

    sql = ""

    def execute(self, sql: str, params: Any = ()) -> None:
        self.sql = sql


@dataclass
class _Chunk:
    """The events with seqs first..last (as read): their decoding problems and, per table in
    order, runs of one statement with its parameters."""

    first: int
    last: int
    problems: list[tuple[int, int, str]]
    statements: list[tuple[str, list[tuple[Any, ...]]]]
    indexes: list[str]  # CREATE INDEX for an UPDATE's WHERE that is not the primary key


class _Statements:
    """The projection statements of decoded events, as `projections.apply` would run them.

    Each change is a statement on one table that reads only that table, so keeping the order
    within each table keeps the result: per table, consecutive identical statements run as one
    `executemany`. An UPDATE of constant values (setting none of its WHERE's columns) whose
    WHERE values equal those of the statement queued just before it on its table writes over
    exactly what that one wrote, which is then dropped (a loss point's `runs.last_step`: 9 in
    10 events). The SQL is the one `apply` builds, learnt once per kind of change."""

    def __init__(self) -> None:
        self.known: dict[tuple[Any, ...], tuple[str, bool]] = {}
        self.tables: defaultdict[str, list[list[Any]]] = defaultdict(list)
        self.indexes: list[str] = []

    def _learn(self, key: tuple[Any, ...], change: projections.Change) -> tuple[str, bool]:
        recorder = _Recorder()
        projections.apply(recorder, [change])  # type: ignore[arg-type]
        drops = False
        if isinstance(change, projections.Update):
            drops = not set(change.values) & set(change.where)
            where = tuple(change.where)
            if where != projections.TABLES[change.table][1][:len(where)]:
                # the live journal may scan for it; the rebuild must not (`checkpoints.path`)
                self.indexes.append(f"CREATE INDEX IF NOT EXISTS rebuild_{change.table}_"
                                    f"{'_'.join(where)} ON {change.table} ({', '.join(where)})")
        self.known[key] = (recorder.sql, drops)
        return recorder.sql, drops

    def add(self, changes: list[projections.Change]) -> None:
        known, tables, upsert = self.known, self.tables, projections.Upsert
        for change in changes:
            table = change.table
            runs = tables[table]  # [sql, its parameters in order, WHERE values of the last]
            if type(change) is upsert:
                row = change.row  # type: ignore[union-attr]
                key: tuple[Any, ...] = (table, *row)
                sql = (known.get(key) or self._learn(key, change))[0]
                if runs and runs[-1][0] is sql:
                    runs[-1][1].append(tuple(row.values()))
                    runs[-1][2] = None
                else:
                    runs.append([sql, [tuple(row.values())], None])
                continue
            values, where = change.values, change.where  # type: ignore[union-attr]
            key = (table, *values, None, *where)
            sql, drops = known.get(key) or self._learn(key, change)
            keys = tuple(where.values())
            params = (*values.values(), *keys)
            if not runs or runs[-1][0] is not sql:
                runs.append([sql, [params], keys if drops else None])
            elif drops and runs[-1][2] == keys:
                runs[-1][1][-1] = params  # writes over the one before it
            else:
                runs[-1][1].append(params)
                runs[-1][2] = keys if drops else None

    def take(self, first: int, last: int, problems: list[tuple[int, int, str]]) -> _Chunk:
        statements = [(sql, params) for runs in self.tables.values() for sql, params, _ in runs]
        self.tables.clear()
        indexes, self.indexes = self.indexes, []
        return _Chunk(first, last, problems, statements, indexes)


def _decode(rows: Iterable[tuple[Any, ...]]) -> Iterator[_Chunk]:
    """Decode the events of `rows` (EVENT_ROWS) into chunks of projection statements. An
    event whose payload or type does not decode is a problem and is skipped (as the chain
    check always reported it); reading stops at damage."""
    validators = {name: cls.__pydantic_validator__.validate_json
                  for name, cls in EVENT_TYPES.items()}
    changes_of = projections.changes
    statements = _Statements()
    problems: list[tuple[int, int, str]] = []
    first = last = None
    count = 0
    try:
        for seq, ts, type_, _schema, text, _prev_hash, _digest in rows:
            if first is None:
                first = seq
            last = seq
            event = None
            if type(text) is str and _LONG_RUN not in text.encode().translate(_DIGITS):
                validate = validators.get(type_)
                if validate is not None:
                    try:  # pydantic parses the JSON itself: as json.loads + decode would
                        event = validate(text)
                    except ValueError:
                        pass
            if event is None:  # the exact way, which names what is wrong
                try:
                    payload = load_payload(text)
                except (TypeError, ValueError) as exc:
                    problems.append((seq, PAYLOAD, f"event seq {seq}: {exc}"))
                    continue
                try:
                    event = decode(type_, payload)
                except KeyError:
                    problems.append((seq, TYPE, f"event seq {seq}: unknown event type {type_!r}"))
                    continue
                except ValidationError as exc:
                    where = ".".join(str(p) for p in exc.errors()[0]["loc"])
                    problems.append((seq, TYPE, f"event seq {seq} ({type_}): bad payload at "
                                                f"{where}"))
                    continue
            try:
                statements.add(changes_of(seq, ts, event))
            except (KeyError, ValueError, ValidationError, OverflowError):
                pass
            count += 1
            if count == CHUNK:
                yield statements.take(first, last, problems)
                problems, first, count = [], None, 0
    except sqlite3.DatabaseError:
        pass  # a damaged page: the chain check names where reading stopped
    if first is not None or problems:
        yield statements.take(first or 0, last or 0, problems)


def _apply(rebuilt: sqlite3.Connection, chunk: _Chunk, journal: Journal) -> None:
    """A chunk's statements in one transaction. If one fails (an integer SQLite cannot hold),
    the chunk is rolled back and its events replayed one by one with `projections.apply`, as
    the journal applies them, each failing event skipped."""
    for index in chunk.indexes:
        rebuilt.execute(index)
    rebuilt.execute("BEGIN")
    try:
        for sql, params in chunk.statements:
            rebuilt.executemany(sql, params)
    except (OverflowError, sqlite3.Error):
        rebuilt.execute("ROLLBACK")
        rebuilt.execute("BEGIN")
        for seq, ts, type_, _schema, text, _prev, _digest in journal.conn.execute(
            EVENT_ROWS + " WHERE seq BETWEEN ? AND ? ORDER BY seq", (chunk.first, chunk.last)
        ):
            try:
                event = decode(type_, load_payload(text))
                projections.apply(rebuilt, projections.changes(seq, ts, event))
            except (KeyError, ValueError, ValidationError, OverflowError):
                continue
            except sqlite3.Error as exc:  # the temporary file, not the journal
                raise JournalError(f"cannot rebuild the projections in a temporary file "
                                   f"({exc}; TMPDIR is {tempfile.gettempdir()})") from None
    rebuilt.execute("COMMIT")


def _open_rebuild(path: str | Path) -> sqlite3.Connection:
    """Empty projection tables in a database at `path` ("": SQLite's private temporary file,
    removed on close): a file, so the page cache, not this process, holds what it does not
    need."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = MEMORY")  # not OFF: a failed chunk is rolled back
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -32768")  # 32 MB: the tables' upper b-tree levels
    projections.create_tables(conn)
    return conn


def rebuild(journal: Journal, path: str | Path = "") -> sqlite3.Connection:
    """Replay every readable event into fresh projection tables in a database at `path` (by
    default SQLite's private temporary file, removed when the connection closes); an
    unreadable or undecodable event is skipped here and reported by `verify`."""
    conn = _open_rebuild(path)
    for chunk in _decode(journal.conn.execute(EVENT_ROWS + " ORDER BY seq")):
        _apply(conn, chunk, journal)
    return conn


# -- decoding in a second process ------------------------------------------------------------


def _decoder(path: str, upto: int, out: Any) -> None:
    """In a spawned process: `_decode` the events up to `upto` and send each chunk. Whatever
    goes wrong ends it quietly: the verifying process then decodes the rest itself, and says
    what is wrong."""
    try:
        conn = connect(Path(path), readonly=True)
        rows = conn.execute(DECODED_ROWS + " WHERE seq <= ? ORDER BY seq", (upto,))
        for chunk in _decode(rows):
            out.send(chunk)
        out.send(None)
    except BaseException:  # noqa: B036 (an interrupt too: the caller has it as well)
        pass
    finally:
        out.close()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Decoding:
    """The chunks of a second process, in order; if it dies, this process decodes the rest
    itself (from the event after the last chunk received)."""

    def __init__(self, journal: Journal, upto: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: connections, threads
        self.journal, self.upto, self.last = journal, upto, 0
        self.receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_decoder, args=(str(journal.path), upto, send),
                                       name="lora-service verify decoder", daemon=True)
        self.process.start()
        send.close()

    def __iter__(self) -> Iterator[_Chunk]:
        try:
            while True:
                try:
                    chunk = self.receive.recv()
                except (EOFError, OSError):
                    break
                if chunk is None:
                    return
                self.last = chunk.last or self.last
                yield chunk
            yield from _decode(self.journal.conn.execute(
                EVENT_ROWS + " WHERE seq > ? AND seq <= ? ORDER BY seq", (self.last, self.upto)))
        finally:
            self.close()

    def close(self) -> None:
        self.receive.close()
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()


# -- the checks ------------------------------------------------------------------------------


def check_chain(journal: Journal, report: Report, rebuilt: sqlite3.Connection) -> None:
    """The chain checks, while the events are decoded and replayed into `rebuilt`."""
    conn = journal.conn
    chain = _Chain()
    decoded: list[tuple[int, int, str]] = []
    damage: list[sqlite3.DatabaseError] = []

    def reading() -> Iterator[tuple[Any, ...]]:
        try:
            yield from conn.execute(EVENT_ROWS + " ORDER BY seq")
        except sqlite3.DatabaseError as exc:
            damage.append(exc)

    rows = reading()
    try:
        upto = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        upto = 0  # damage: the pass over the events names where reading stops
    decoding = None
    if upto >= PARALLEL_FROM and _cores() > 1:
        try:
            decoding = _Decoding(journal, upto)
        except OSError:  # no second process here: this one decodes
            decoding = None
    if decoding is not None:
        for chunk in decoding:
            decoded += chunk.problems
            _apply(rebuilt, chunk, journal)
            chain.run(rows, until=chunk.last)  # the same events, read by this process
        chain.run(rows)
    else:
        while batch := list(islice(rows, CHUNK)):
            chain.run(batch)
            for chunk in _decode(batch):
                decoded += chunk.problems
                _apply(rebuilt, chunk, journal)
    report.events += chain.read
    last = chain.expected - 1
    if damage:  # what the other process read past the damage this one stopped at
        decoded = [problem for problem in decoded if problem[0] <= last]
    problems = sorted(chain.problems + decoded, key=lambda p: (p[0], p[1]))
    report.problems += [text for _seq, _order, text in problems]
    if damage:
        report.problems.append(f"events after seq {last} cannot be read ({damage[0]})")
        return
    position = journal.projected_seq()
    if report.events and position != last:
        report.problems.append(f"projection position is {position}, journal ends at {last}")


def _columns(conn: sqlite3.Connection, schema: str, table: str) -> list[tuple[Any, ...]]:
    """(name, declared type, position in the primary key) of each column."""
    rows = conn.execute(f"PRAGMA {schema}.table_info({table})")
    return [(row[1], row[2], row[5]) for row in rows]


def _match(pk: tuple[str, ...], columns: list[str], a: str, b: str) -> str:
    """SQL: rows `a` and `b` have the same key (`=`) and the same values (`IS`: NULL is NULL)."""
    return " AND ".join([*(f"{a}.{k} = {b}.{k}" for k in pk),
                         *(f"{a}.{c} IS {b}.{c}" for c in columns if c not in pk)])


def check_projections(journal: Journal, report: Report) -> None:
    """Each live table against its rebuild, attached to the journal's connection as `rebuilt`,
    inside SQLite whatever the tables' length: equal when both have the same columns and as
    many rows as the join of their identical rows (the primary key makes rows unique)."""
    conn = journal.conn
    for table, (_ddl, pk) in projections.TABLES.items():
        live, fresh = _columns(conn, "main", table), _columns(conn, "rebuilt", table)
        if not live:
            raise sqlite3.OperationalError(f"no such table: {table}")
        if live != fresh:
            report.problems.append(
                f"projection {table}: columns {[c[0] for c in live]} are not the rebuild's "
                f"{[c[0] for c in fresh]}")
            continue
        names = [c[0] for c in live]
        counts = conn.execute(
            f"SELECT (SELECT count(*) FROM main.{table}), (SELECT count(*) FROM rebuilt.{table}),"
            f" (SELECT count(*) FROM main.{table} AS a JOIN rebuilt.{table} AS b"
            f" ON {_match(pk, names, 'a', 'b')})").fetchone()
        if counts[0] == counts[1] == counts[2]:
            continue
        key = ", ".join(f"x.{k}" for k in pk)
        differing = conn.execute(
            f"SELECT {key} FROM main.{table} AS x WHERE NOT EXISTS (SELECT 1 FROM"
            f" rebuilt.{table} AS y WHERE {_match(pk, names, 'x', 'y')})"
            f" UNION SELECT {key} FROM rebuilt.{table} AS x WHERE NOT EXISTS (SELECT 1 FROM"
            f" main.{table} AS y WHERE {_match(pk, names, 'x', 'y')})"
        )
        named: list[tuple[Any, ...]] = []
        more = 0
        for row in differing:
            if len(named) < ROWS_NAMED:
                named.append(tuple(row))
            else:
                more += 1
        for row in sorted(named, key=repr):
            shown = row[0] if len(row) == 1 else row
            report.problems.append(
                f"projection {table} row {shown!r} differs from its rebuild from events")
        if more:
            report.problems.append(
                f"projection {table}: {more} more rows differ from their rebuild")


def check_files(state_dir: Path, rebuilt: sqlite3.Connection, report: Report) -> None:
    state = os.fspath(state_dir)
    for path, sha, seq in rebuilt.execute(
        "SELECT path, sha256, seq FROM files WHERE released = 0 ORDER BY path"
    ):
        report.files += 1
        full = os.path.join(state, path)  # (not Path: tens of thousands of files)
        if not os.path.isfile(full):
            report.problems.append(f"file {path}: missing (recorded by event seq {seq})")
            continue
        try:
            if sha256_file(full) != sha:  # type: ignore[arg-type]
                report.problems.append(f"file {path}: sha256 differs from event seq {seq}")
        except OSError as exc:
            report.problems.append(f"file {path}: cannot be read ({exc.strerror})")


class _FileCheck(threading.Thread):
    """`check_files` on a connection of its own to the rebuild at `path`."""

    def __init__(self, state_dir: Path, path: str) -> None:
        super().__init__(name="check_files", daemon=True)
        self.state_dir, self.path = state_dir, path
        self.report = Report()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path)
            try:
                check_files(self.state_dir, conn, self.report)
            finally:
                conn.close()
        except BaseException as exc:  # raised again by the caller
            self.error = exc


class _IntegrityCheck(threading.Thread):
    """SQLite's `integrity_check(20)` on a connection of its own: it reads every page and
    index in C with the GIL released, beside the pass over the events."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="integrity_check", daemon=True)
        self.path = path
        self.damage: list[str] = ["not run"]

    def run(self) -> None:
        try:
            conn = connect(self.path, readonly=True)
        except sqlite3.DatabaseError as exc:
            self.damage = [str(exc)]
            return
        try:
            self.damage = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
        except sqlite3.DatabaseError as exc:
            self.damage = [str(exc)]
        finally:
            conn.close()


def verify(journal: Journal, state_dir: Path) -> Report:
    report = Report()
    integrity = _IntegrityCheck(journal.path)
    integrity.start()
    conn = journal.conn
    with tempfile.TemporaryDirectory(prefix="lora-service-verify-") as tmp:
        path = os.path.join(tmp, "rebuilt.sqlite")
        rebuilt = _open_rebuild(path)
        try:
            conn.execute("ATTACH DATABASE ? AS rebuilt", (path,))
            unattached = None
        except sqlite3.DatabaseError as exc:  # the journal's own schema cannot be read
            unattached = exc
        try:
            conn.execute("BEGIN")  # one snapshot: chain, position and projections agree
            try:
                report.problems += schema_problems(conn)
            except sqlite3.DatabaseError as exc:
                report.problems.append(f"schema cannot be read ({exc})")
            try:
                check_chain(journal, report, rebuilt)
            except JournalError as exc:  # the position row
                report.problems.append(str(exc))
            # the files (Python, file reads) beside the tables' comparison (SQLite, no GIL)
            files = _FileCheck(state_dir, path)
            files.start()
            try:
                if unattached is not None:
                    raise unattached
                check_projections(journal, report)
            except sqlite3.DatabaseError as exc:
                report.problems.append(f"projection tables cannot be read ({exc})")
            finally:
                files.join()
            if files.error is not None:
                raise files.error
            report.files += files.report.files
            report.problems += files.report.problems
        finally:
            rebuilt.close()
            try:  # it only read: ending the transaction either way is the same
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if unattached is None:
                    conn.execute("DETACH DATABASE rebuilt")
            except sqlite3.DatabaseError:
                pass  # damage, reported above
    integrity.join()
    if integrity.damage != ["ok"]:
        report.problems.insert(0, f"sqlite integrity_check: {'; '.join(integrity.damage)}")
    return report
