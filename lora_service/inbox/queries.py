"""The `batches` command's rows: every intake decision, newest last, from the projections.

Accepted batches take their training status (pending, trained in vNNNN, held in vNNNN, out of
lineage) from `lora_service.journal.queries.batch_states`, which knows the head's lineage;
rejected and duplicate drops are listed too, so a user sees why a folder was not trained.
"""

from __future__ import annotations

from typing import Any

from lora_service.journal import Journal, queries


def list_batches(journal: Journal) -> list[dict[str, Any]]:
    """One dict per decided intake: batch_id, name, status, images, caption_sources, bad,
    notes, reason, moved_to, seq, ts (in journal order)."""
    states = queries.batch_states(journal)
    batches = queries.batch_rows(journal)
    out: list[dict[str, Any]] = []
    for row in queries.decided_intakes(journal):
        batch = batches.get(row.batch_id) if row.batch_id else None
        if row.outcome == "accepted":
            state = states.get(row.batch_id) if row.batch_id else None
            status = state.status if state else "pending"
        else:
            status = row.outcome
        out.append({
            "batch_id": row.batch_id,
            "name": row.name,
            "status": status,
            "images": batch.images if batch and row.outcome == "accepted" else 0,
            "caption_sources": list(batch.caption_sources) if batch else [],
            "bad": list(row.bad),
            "notes": list(row.notes),
            "reason": row.reason,
            "moved_to": row.moved_to,
            "seq": row.seq,
            "ts": row.ts,
        })
    return out
