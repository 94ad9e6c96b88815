"""Projections: the query tables, as pure functions of single events.

`changes(seq, ts, event)` returns the row upserts/updates one event causes and reads nothing,
so the same function serves the live journal (applied in the event's own transaction) and
`rebuild` (applied to an empty in-memory database): a projection can always be rebuilt and
compared. Derived facts that need more than one row (a batch's status, the head's lineage) are
computed at query time in `lora_service.journal.queries`, not stored.
"""

from __future__ import annotations

import json
import posixpath
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from functools import singledispatch
from typing import Any

from lora_service.journal import events as ev

# table -> (columns DDL, primary key columns)
TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "base_models": ("sha256 TEXT, spec TEXT, path TEXT, kind TEXT, seq INTEGER", ("sha256",)),
    "intakes": (
        "seq INTEGER, ts TEXT, name TEXT, outcome TEXT, batch_id TEXT, reason TEXT,"
        " bad TEXT, notes TEXT, moved_to TEXT",
        ("seq",),
    ),
    "batches": (
        "batch_id TEXT, name TEXT, images INTEGER, caption_sources TEXT, accepted_seq INTEGER,"
        " accepted_at TEXT",
        ("batch_id",),
    ),
    "batch_images": (
        "batch_id TEXT, file TEXT, sha256 TEXT, caption TEXT, caption_source TEXT,"
        " width INTEGER, height INTEGER",
        ("batch_id", "file"),
    ),
    "requeues": ("seq INTEGER, batch_id TEXT, reason TEXT", ("seq",)),
    "requests": ("seq INTEGER, ts TEXT, fresh INTEGER, reason TEXT, run_id TEXT", ("seq",)),
    "runs": (
        "run_id TEXT, status TEXT, parent TEXT, fresh INTEGER, batches TEXT, rehearsal TEXT,"
        " base_sha256 TEXT, start_step INTEGER, total_steps INTEGER, last_step INTEGER,"
        " last_checkpoint TEXT, learning_rate REAL, epochs INTEGER, seed INTEGER,"
        " threads INTEGER, config TEXT, started_seq INTEGER, started_at TEXT,"
        " resumed_seq INTEGER, failures INTEGER, last_error TEXT, version TEXT, ended_at TEXT",
        ("run_id",),
    ),
    "checkpoints": (
        "run_id TEXT, step INTEGER, path TEXT, seq INTEGER, released INTEGER",
        ("run_id", "step"),
    ),
    "versions": (
        "version TEXT, run_id TEXT, parent TEXT, created_seq INTEGER, created_at TEXT,"
        " batches TEXT, new_batches TEXT, images INTEGER, step INTEGER, steps INTEGER,"
        " train_loss REAL, val_loss REAL, val_loss_per_batch TEXT, val_loss_known REAL,"
        " base_sha256 TEXT, held INTEGER, held_reason TEXT, files TEXT",
        ("version",),
    ),
    "version_batches": ("version TEXT, batch_id TEXT, new INTEGER", ("version", "batch_id")),
    "head": (
        "id INTEGER, version TEXT, previous TEXT, reason TEXT, moved_by TEXT, seq INTEGER, ts TEXT",
        ("id",),
    ),
    "loss_points": (
        "seq INTEGER, run_id TEXT, step INTEGER, loss REAL, lr REAL, images_per_s REAL",
        ("seq",),
    ),
    "samples": (
        "version TEXT, seq INTEGER, prompts TEXT, seeds TEXT, seconds REAL, error TEXT, files TEXT",
        ("version",),
    ),
    "exports": (
        "seq INTEGER, version TEXT, path TEXT, sha256 TEXT, kind TEXT, format TEXT",
        ("seq",),
    ),
    "files": ("path TEXT, sha256 TEXT, seq INTEGER, released INTEGER", ("path",)),
}


@dataclass(frozen=True)
class Upsert:
    """Insert a row, or on a primary-key clash update just the given columns."""

    table: str
    row: dict[str, Any]


@dataclass(frozen=True)
class Update:
    """Update the given columns of the rows matching `where` (equality on each key)."""

    table: str
    values: dict[str, Any]
    where: dict[str, Any]


Change = Upsert | Update


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return canonical(value)


@singledispatch
def _changes(event: ev.Event, seq: int, ts: str) -> list[Change]:
    return []


def changes(seq: int, ts: str, event: ev.Event) -> list[Change]:
    """All projection changes of one event: its own, plus the file register's. The type's
    function is looked up by the cached `dispatch`, and an event that records and releases no
    file (most of them) skips the register: `verify` replays a million of these."""
    out = _changes.dispatch(type(event))(event, seq, ts)
    if not event.files and not event.released:
        return out
    out = list(out)
    for path, sha in sorted(event.files.items()):
        out.append(Upsert("files", {"path": path, "sha256": sha, "seq": seq, "released": 0}))
    for path in event.released:
        out.append(Update("files", {"released": 1}, {"path": path}))
    return out


@_changes.register
def _(event: ev.BaseModelRegistered, seq: int, ts: str) -> list[Change]:
    row = {"sha256": event.sha256, "spec": event.spec, "path": event.path, "kind": event.kind}
    return [Upsert("base_models", row | {"seq": seq})]


def _intake(seq: int, ts: str, name: str, outcome: str, **rest: Any) -> Upsert:
    row = {"seq": seq, "ts": ts, "name": name, "outcome": outcome, "batch_id": None}
    row |= {"reason": None, "bad": "[]", "notes": "[]", "moved_to": None}
    return Upsert("intakes", row | rest)


@_changes.register
def _(event: ev.BatchDetected, seq: int, ts: str) -> list[Change]:
    return [_intake(seq, ts, event.name, "detected")]


@_changes.register
def _(event: ev.BatchAccepted, seq: int, ts: str) -> list[Change]:
    sources = sorted({image.caption_source for image in event.images})
    out: list[Change] = [
        _intake(
            seq,
            ts,
            event.name,
            "accepted",
            batch_id=event.batch_id,
            bad=_json([b.model_dump() for b in event.bad]),
            notes=_json(event.notes),
            moved_to=event.moved_to,
        ),
        Upsert(
            "batches",
            {
                "batch_id": event.batch_id,
                "name": event.name,
                "images": len(event.images),
                "caption_sources": _json(sources),
                "accepted_seq": seq,
                "accepted_at": ts,
            },
        ),
    ]
    for image in event.images:
        out.append(Upsert("batch_images", {"batch_id": event.batch_id, **image.model_dump()}))
    return out


@_changes.register
def _(event: ev.BatchRejected, seq: int, ts: str) -> list[Change]:
    bad = _json([b.model_dump() for b in event.bad])
    return [
        _intake(
            seq,
            ts,
            event.name,
            "rejected",
            reason=event.reason,
            bad=bad,
            notes=_json(event.notes),
            moved_to=event.moved_to,
        )
    ]


@_changes.register
def _(event: ev.BatchDuplicate, seq: int, ts: str) -> list[Change]:
    return [
        _intake(
            seq,
            ts,
            event.name,
            "duplicate",
            batch_id=event.batch_id,
            reason=f"same content as {event.duplicate_of}",
            moved_to=event.moved_to,
        )
    ]


@_changes.register
def _(event: ev.BatchRequeued, seq: int, ts: str) -> list[Change]:
    return [Upsert("requeues", {"seq": seq, "batch_id": event.batch_id, "reason": event.reason})]


@_changes.register
def _(event: ev.TrainingRequested, seq: int, ts: str) -> list[Change]:
    row = {"seq": seq, "ts": ts, "fresh": int(event.fresh), "reason": event.reason}
    return [Upsert("requests", row | {"run_id": None})]


@_changes.register
def _(event: ev.RunStarted, seq: int, ts: str) -> list[Change]:
    row = {
        "run_id": event.run_id,
        "status": "running",
        "parent": event.parent,
        "fresh": int(event.fresh),
        "batches": _json(event.batches),
        "rehearsal": _json(event.rehearsal),
        "base_sha256": event.base_sha256,
        "start_step": event.start_step,
        "total_steps": event.total_steps,
        "last_step": event.start_step,
        "last_checkpoint": None,
        "learning_rate": event.learning_rate,
        "epochs": event.epochs,
        "seed": event.seed,
        "threads": event.threads,
        "config": _json(event.config),
        "started_seq": seq,
        "started_at": ts,
        "resumed_seq": None,
        "failures": 0,
        "last_error": None,
        "version": None,
        "ended_at": None,
    }
    out: list[Change] = [Upsert("runs", row)]
    if event.request_seq is not None:
        out.append(Update("requests", {"run_id": event.run_id}, {"seq": event.request_seq}))
    return out


@_changes.register
def _(event: ev.CheckpointSaved, seq: int, ts: str) -> list[Change]:
    row = {"run_id": event.run_id, "step": event.step, "path": event.path, "seq": seq}
    out: list[Change] = [
        Upsert("checkpoints", row | {"released": 0}),
        Update(
            "runs",
            {"last_checkpoint": event.path, "last_step": event.step},
            {"run_id": event.run_id},
        ),
    ]
    for folder in sorted({posixpath.dirname(p) for p in event.released}):
        out.append(Update("checkpoints", {"released": 1}, {"path": folder}))
    return out


@_changes.register
def _(event: ev.LossLogged, seq: int, ts: str) -> list[Change]:
    row = {"seq": seq, "run_id": event.run_id, "step": event.step, "loss": event.loss}
    return [
        Upsert("loss_points", row | {"lr": event.lr, "images_per_s": event.images_per_s}),
        # status shows progress between checkpoints
        Update("runs", {"last_step": event.step}, {"run_id": event.run_id}),
    ]


@_changes.register
def _(event: ev.RunResumed, seq: int, ts: str) -> list[Change]:
    return [
        Update(
            "runs",
            {"status": "running", "resumed_seq": seq, "last_step": event.from_step},
            {"run_id": event.run_id},
        )
    ]


@_changes.register
def _(event: ev.RunFailed, seq: int, ts: str) -> list[Change]:
    status = "gave_up" if event.gave_up else "failed"
    values = {"status": status, "failures": event.attempt, "last_error": event.reason}
    return [Update("runs", values | {"ended_at": ts}, {"run_id": event.run_id})]


@_changes.register
def _(event: ev.VersionCreated, seq: int, ts: str) -> list[Change]:
    row = {
        "version": event.version,
        "run_id": event.run_id,
        "parent": event.parent,
        "created_seq": seq,
        "created_at": ts,
        "batches": _json(event.batches),
        "new_batches": _json(event.new_batches),
        "images": event.images,
        "step": event.step,
        "steps": event.steps,
        "train_loss": event.train_loss,
        "val_loss": event.val_loss,
        "val_loss_per_batch": _json(event.val_loss_per_batch),
        "val_loss_known": event.val_loss_known,
        "base_sha256": event.base_sha256,
        "held": 0,
        "held_reason": None,
        "files": _json(event.files),
    }
    out: list[Change] = [
        Upsert("versions", row),
        Update(
            "runs",
            {
                "status": "finished",
                "version": event.version,
                "last_step": event.step,
                "ended_at": ts,
            },
            {"run_id": event.run_id},
        ),
    ]
    for batch_id in event.batches:
        new = int(batch_id in event.new_batches)
        out.append(
            Upsert("version_batches", {"version": event.version, "batch_id": batch_id, "new": new})
        )
    return out


@_changes.register
def _(event: ev.VersionHeld, seq: int, ts: str) -> list[Change]:
    return [
        Update("versions", {"held": 1, "held_reason": event.reason}, {"version": event.version})
    ]


@_changes.register
def _(event: ev.VersionImported, seq: int, ts: str) -> list[Change]:
    """A version like a trained one, with no run, parent, batches or losses (step 0: the next
    run's steps count from it). Where it came from is in the event (`queries.imported`)."""
    row = {
        "version": event.version,
        "run_id": None,
        "parent": None,
        "created_seq": seq,
        "created_at": ts,
        "batches": "[]",
        "new_batches": "[]",
        "images": 0,
        "step": 0,
        "steps": 0,
        "train_loss": None,
        "val_loss": None,
        "val_loss_per_batch": "{}",
        "val_loss_known": None,
        "base_sha256": event.base_sha256,
        "held": 0,
        "held_reason": None,
        "files": _json(event.files),
    }
    return [Upsert("versions", row)]


@_changes.register
def _(event: ev.HeadMoved, seq: int, ts: str) -> list[Change]:
    row = {"id": 1, "version": event.version, "previous": event.previous, "reason": event.reason}
    return [
        Upsert("head", row | {"moved_by": event.by, "seq": seq, "ts": ts}),
        Update("versions", {"held": 0}, {"version": event.version}),
    ]


@_changes.register
def _(event: ev.VersionExported, seq: int, ts: str) -> list[Change]:
    row = {"seq": seq, "version": event.version, "path": event.path, "sha256": event.sha256}
    return [Upsert("exports", row | {"kind": event.kind, "format": event.format})]


@_changes.register
def _(event: ev.SamplesRendered, seq: int, ts: str) -> list[Change]:
    row = {
        "version": event.version,
        "seq": seq,
        "prompts": _json(event.prompts),
        "seeds": _json(event.seeds),
        "seconds": event.seconds,
        "error": event.error,
        "files": _json(event.files),
    }
    return [Upsert("samples", row)]


# -- applying --------------------------------------------------------------------------------


def create_tables(conn: sqlite3.Connection) -> None:
    for table, (columns, pk) in TABLES.items():
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} ({columns}, PRIMARY KEY ({', '.join(pk)}))"
        )


def apply(conn: sqlite3.Connection, batch: Iterable[Change]) -> None:
    """Apply changes inside the caller's transaction."""
    for change in batch:
        if isinstance(change, Upsert):
            cols = list(change.row)
            pk = TABLES[change.table][1]
            updates = [c for c in cols if c not in pk]
            sql = (
                f"INSERT INTO {change.table} ({', '.join(cols)}) "
                f"VALUES ({', '.join('?' for _ in cols)}) "
                f"ON CONFLICT ({', '.join(pk)}) DO "
                + (
                    f"UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in updates)}"
                    if updates
                    else "NOTHING"
                )
            )
            conn.execute(sql, [change.row[c] for c in cols])
        else:
            sets = ", ".join(f"{c}=?" for c in change.values)
            where = " AND ".join(f"{c}=?" for c in change.where)
            conn.execute(
                f"UPDATE {change.table} SET {sets} WHERE {where}",
                [*change.values.values(), *change.where.values()],
            )


def snapshot(conn: sqlite3.Connection, table: str) -> list[tuple[Any, ...]]:
    pk = TABLES[table][1]
    return list(conn.execute(f"SELECT * FROM {table} ORDER BY {', '.join(pk)}"))
