"""Read-side questions answered from the projection tables (no torch, no writes).

Facts that depend on more than one row — the head's lineage, whether a batch is pending or out
of the lineage after a rollback — are derived here at query time rather than stored, so a
rollback never has to rewrite earlier rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lora_service.journal.sqlite import Journal


def head(journal: Journal) -> dict[str, Any] | None:
    rows = journal.query("SELECT * FROM head WHERE id = 1")
    return rows[0] if rows else None


def head_version(journal: Journal) -> str | None:
    row = head(journal)
    return row["version"] if row else None


def version(journal: Journal, name: str) -> dict[str, Any] | None:
    rows = journal.query("SELECT * FROM versions WHERE version = ?", [name])
    return rows[0] if rows else None


def imported(journal: Journal, name: str) -> dict[str, Any] | None:
    """The `VersionImported` payload of `name` (origin, format, sha256, geometry, ...), with
    its `seq`; None for a version trained here. Read from the event itself: an import is rare
    and needs no projection table of its own."""
    rows = journal.query(
        "SELECT seq, payload FROM events WHERE type = 'VersionImported'"
        " AND json_extract(payload, '$.version') = ? ORDER BY seq DESC LIMIT 1",
        [name],
    )
    return {**json.loads(rows[0]["payload"]), "seq": rows[0]["seq"]} if rows else None


def lineage(journal: Journal, name: str | None) -> list[str]:
    """`name`, its parent, its parent's parent ... back to the first version of the lineage."""
    parents = {
        r["version"]: r["parent"] for r in journal.query("SELECT version, parent FROM versions")
    }
    chain: list[str] = []
    while name is not None and name in parents and name not in chain:
        chain.append(name)
        name = parents[name]
    return chain


@dataclass(frozen=True)
class BatchState:
    batch_id: str
    status: str  # pending | trained in vNNNN | held in vNNNN | out of lineage
    versions: tuple[str, ...]  # every version that trained on it, oldest first
    pending: bool


def batch_states(journal: Journal) -> dict[str, BatchState]:
    """The training status of every accepted batch relative to the current head."""
    in_lineage = set(lineage(journal, head_version(journal)))
    trained: dict[str, list[tuple[int, str, bool]]] = {}
    for row in journal.query(
        "SELECT vb.batch_id, v.version, v.created_seq, v.held FROM version_batches vb"
        " JOIN versions v ON v.version = vb.version ORDER BY v.created_seq"
    ):
        trained.setdefault(row["batch_id"], []).append(
            (row["created_seq"], row["version"], bool(row["held"]))
        )
    requeued: dict[str, int] = {}
    for row in journal.query("SELECT batch_id, max(seq) AS seq FROM requeues GROUP BY batch_id"):
        requeued[row["batch_id"]] = row["seq"]

    states: dict[str, BatchState] = {}
    for row in journal.query("SELECT batch_id FROM batches ORDER BY accepted_seq"):
        batch_id = row["batch_id"]
        history = trained.get(batch_id, [])
        versions = tuple(v for _, v, _ in history)
        mine = [v for _, v, _ in history if v in in_lineage]
        if mine:
            states[batch_id] = BatchState(batch_id, f"trained in {mine[-1]}", versions, False)
            continue
        last_seq = history[-1][0] if history else 0
        if not history or requeued.get(batch_id, 0) > last_seq:
            states[batch_id] = BatchState(batch_id, "pending", versions, True)
        elif history[-1][2]:
            states[batch_id] = BatchState(batch_id, f"held in {history[-1][1]}", versions, False)
        else:
            states[batch_id] = BatchState(batch_id, "out of lineage", versions, False)
    return states


def pending_batches(journal: Journal) -> list[str]:
    return [b for b, state in batch_states(journal).items() if state.pending]


def pending_images(journal: Journal) -> int:
    pending = pending_batches(journal)
    if not pending:
        return 0
    marks = ", ".join("?" for _ in pending)
    rows = journal.query(
        f"SELECT sum(images) AS n FROM batches WHERE batch_id IN ({marks})", pending
    )
    return int(rows[0]["n"] or 0)


def running_run(journal: Journal) -> dict[str, Any] | None:
    rows = journal.query(
        "SELECT * FROM runs WHERE status = 'running' ORDER BY started_seq DESC LIMIT 1"
    )
    return rows[0] if rows else None


def loads(value: str | None) -> Any:
    return json.loads(value) if value else None
