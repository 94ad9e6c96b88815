"""What `versions`, `loss` and `audit` show: plain dicts read from the journal. No torch.

Everything here is a query over the projection tables (and, for the audit, the events
themselves), so the answers are exactly what the journal proves; the only files read are the
ones the audit re-hashes to check them against the journaled sha256s.

Steps: a version's `step` is the global step at its end (counted across the lineage), `steps`
is its own run's; its run covered global steps `step - steps + 1 … step`. The loss curve of a
version is the curve of its lineage: its ancestors' runs, then its own.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from lora_service.journal import Journal, queries
from lora_service.versions.heads import version_files, version_row
from lora_service.versions.verify import verify_version_files

# the events an audit lists for each version in the lineage
RUN_EVENTS = ("RunStarted", "CheckpointSaved", "RunResumed", "RunFailed")
VERSION_EVENTS = (
    "VersionCreated", "HeadMoved", "VersionHeld", "VersionExported", "SamplesRendered",
    "VersionImported",
)


# -- versions --------------------------------------------------------------------------------


def _version_dict(row: dict[str, Any], head: str | None, in_lineage: set[str],
                  judged: dict[str, Any]) -> dict[str, Any]:
    name = row["version"]
    held = bool(row["held"])
    return {
        "version": name,
        "parent": row["parent"],
        "created_at": row["created_at"],
        "run_id": row["run_id"],
        "batches": queries.loads(row["batches"], []),
        "new_batches": queries.loads(row["new_batches"], []),
        "images": row["images"],
        "step": row["step"],
        "steps": row["steps"],
        "start_step": (row["step"] or 0) - (row["steps"] or 0),
        "train_loss": row["train_loss"],
        "val_loss": row["val_loss"],
        "val_loss_per_batch": queries.loads(row["val_loss_per_batch"], {}),
        "val_loss_known": row["val_loss_known"],
        "base_sha256": row["base_sha256"],
        "head": name == head,
        "in_head_lineage": name in in_lineage,
        "held": held,
        "held_reason": row["held_reason"] if held else None,
        # the base's judge on the samples, per concept (models/judge.py); {} without one
        "judge": judged.get(name, {}),
    }


def version_rows(journal: Journal) -> list[dict[str, Any]]:
    """Every version, oldest first, with its losses and where it stands relative to the head.

    `head` marks the head; `in_head_lineage` the head and its ancestors (what the next run
    builds on); `held` a version the promotion gate (or a manual gate) kept off the head."""
    head = queries.head_version(journal)
    in_lineage = set(queries.lineage(journal, head))
    judged = queries.judged(journal)
    return [_version_dict(row, head, in_lineage, judged) for row in queries.versions(journal)]


def tree_labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """`version` → the name indented under its parent ("v0001", "└─ v0002", ...), so a table
    ordered by creation still shows the branches a rollback made."""
    parents = {r["version"]: r["parent"] for r in rows}
    labels = {}
    for row in rows:
        depth, name, seen = 0, row["parent"], set()
        while name is not None and name in parents and name not in seen:
            seen.add(name)
            depth += 1
            name = parents[name]
        labels[row["version"]] = ("  " * (depth - 1) + "└─ " if depth else "") + row["version"]
    return labels


# -- loss ------------------------------------------------------------------------------------


def _loss_version(row: dict[str, Any], head: str | None) -> dict[str, Any]:
    """Of `_version_dict(row, ...)`, what `loss_series` shows."""
    return {
        "version": row["version"],
        "parent": row["parent"],
        "run_id": row["run_id"],
        "start_step": (row["step"] or 0) - (row["steps"] or 0),
        "step": row["step"],
        "steps": row["steps"],
        "train_loss": row["train_loss"],
        "val_loss": row["val_loss"],
        "val_loss_per_batch": queries.loads(row["val_loss_per_batch"], {}),
        "val_loss_known": row["val_loss_known"],
        "head": row["version"] == head,
        "held": bool(row["held"]),
    }


def _lineage_runs(
    journal: Journal, version: str | None
) -> tuple[str | None, list[str], list[dict[str, Any]], list[tuple[str, str | None]]]:
    """(target, its lineage oldest first, what `loss` shows of each (`_loss_version`), their
    runs as (run_id, version) pairs plus, when `version` is None, a run now training on the
    head as (run_id, None))."""
    if version is not None:
        version_row(journal, version)  # UsageError for an unknown version
    head = queries.head_version(journal)
    target = version if version is not None else head
    chain = list(reversed(queries.lineage(journal, target)))  # oldest first
    rows = queries.loss_versions(journal)  # what `version_rows` says of each, less the rest
    versions = [_loss_version(rows[name], head) for name in chain]
    runs = {r["run_id"]: r["version"] for r in versions if r["run_id"] is not None}
    if version is None:
        running = queries.running_run(journal)
        if running and running["parent"] == target and running["run_id"] not in runs:
            runs[running["run_id"]] = None
    return target, chain, versions, list(runs.items())


def loss_series(
    journal: Journal, version: str | None = None, *, points: int | None = queries.LOSS_POINTS
) -> dict[str, Any]:
    """Losses of a lineage: `version`'s (the head's when None), oldest version first.

    Returns `{"version", "lineage", "versions", "points", "downsampled"}`: `versions` holds
    each lineage version's train/validation losses and step range; `points` the logged train
    losses of their runs by step (`step` is global), plus, when `version` is None, those of a
    run now training on top of the head (`version` null). A step logged twice (a run resumed
    from a checkpoint re-logs the steps after it) keeps the later point: it is the one that
    counts. With `points` N, a curve of more than N points is downsampled on the way out of
    SQLite to the lowest and highest loss of equal step ranges (`queries.loss_curve`), and
    `downsampled` says so (`total_points`, `buckets`, `bucket_steps`); with None, `points`
    is every point, as an iterator (a million are not held at once)."""
    target, chain, versions, runs = _lineage_runs(journal, version)
    if points is None:
        curve: Any = queries.loss_points(journal, runs)
        downsampled = None
    else:
        loss_curve = queries.loss_curve(journal, runs, points)
        curve, downsampled = loss_curve.points, loss_curve.downsampled()
    return {
        "version": target,
        "lineage": chain,
        "versions": versions,
        "points": curve,
        "downsampled": downsampled,
    }


def loss_tail(journal: Journal, version: str | None, count: int) -> list[dict[str, Any]]:
    """The last `count` points of `loss_series(journal, version)`, whole."""
    return queries.loss_tail(journal, _lineage_runs(journal, version)[3], count)


# -- audit -----------------------------------------------------------------------------------


def _events_of(journal: Journal, run_id: str, version: str) -> list[dict[str, Any]]:
    """The events that made `version` (its run's life) and what happened to it since."""
    return [asdict(fact) for fact in queries.event_records(
        journal, run_id=run_id, version=version, run_types=RUN_EVENTS,
        version_types=VERSION_EVENTS)]


def _batch_record(journal: Journal, batch_id: str, new: bool) -> dict[str, Any]:
    batch = queries.batch(journal, batch_id)
    images = queries.batch_image_records(journal, batch_id)
    accepted = queries.event_records(journal, batch_id=batch_id)
    return {
        "batch_id": batch_id,
        "name": batch.name if batch else None,
        "new": new,
        "accepted_seq": accepted[0].seq if accepted else None,
        "accepted_hash": accepted[0].hash if accepted else None,
        "images": images,
    }


def _check(state: Path, files: dict[str, str]) -> tuple[list[str], list[str]]:
    """(paths checked, problems) for a {state-relative path: sha256} map."""
    return sorted(files), verify_version_files(state, files)


def _batch_files(journal: Journal, batch_id: str, images: list[dict[str, Any]]) -> dict[str, str]:
    """Every journaled file of a batch (images and captions), images by their record's hash."""
    prefix = f"batches/{batch_id}/"
    files = queries.live_files_under(journal, prefix)
    for image in images:
        files[prefix + image["file"]] = image["sha256"]
    return files


def audit_record(journal: Journal, state: Path, version: str) -> dict[str, Any]:
    """The full provenance of `version` and a check of every file it depends on.

    `lineage` runs from `version` back to the first version of its lineage; each entry holds
    its batches (every image's sha256, caption and caption source), the run's effective
    configuration, seed, learning rate and the events (seq, type, hash, payload) that made it.
    `base_model` is the registered base model (sha256, spec, path). `verification` re-hashes
    every version file of the lineage, every file of every batch trained into it and the base
    model's journaled files: `ok` is False and `problems` names each file that is missing or
    differs from its journaled sha256."""
    version_row(journal, version)  # UsageError for an unknown version
    rows = {r["version"]: r for r in version_rows(journal)}
    chain = queries.lineage(journal, version)
    lineage: list[dict[str, Any]] = []
    checked: list[str] = []
    problems: list[str] = []
    seen_batches: set[str] = set()
    for name in chain:
        row = rows[name]
        run = queries.run(journal, row["run_id"]) or {}
        batches = [
            _batch_record(journal, b, b in row["new_batches"]) for b in row["batches"]
        ]
        files = version_files(version_row(journal, name))
        paths, bad = _check(state, files)
        checked += paths
        problems += bad
        for batch in batches:
            if batch["batch_id"] in seen_batches:
                continue
            seen_batches.add(batch["batch_id"])
            paths, bad = _check(state, _batch_files(journal, batch["batch_id"], batch["images"]))
            checked += paths
            problems += bad
        lineage.append({
            **{k: row[k] for k in ("version", "parent", "created_at", "run_id", "images", "step",
                                   "steps", "start_step", "train_loss", "val_loss",
                                   "val_loss_per_batch", "head", "held", "held_reason")},
            "seed": run.get("seed"),
            "learning_rate": run.get("learning_rate"),
            "epochs": run.get("epochs"),
            "threads": run.get("threads"),
            "fresh": bool(run.get("fresh")),
            "config": queries.loads(run.get("config"), {}),
            "files": files,
            # an adapter trained elsewhere: origin name, format, file sha256, geometry
            "imported": queries.imported(journal, name),
            "batches": batches,
            "events": _events_of(journal, row["run_id"], name),
        })
    base_sha = rows[version]["base_sha256"]
    base_row = queries.base_model(journal, base_sha)
    base: dict[str, Any] = {"sha256": base_sha, "spec": None, "path": None, "kind": None,
                            "seq": None, "hash": None, "files": {}}
    if base_row:
        registered = queries.event_records(journal, seq=base_row["seq"])
        base |= {k: base_row[k] for k in ("spec", "path", "kind", "seq")}
        if registered:
            base["hash"] = registered[0].hash
            base["files"] = registered[0].payload.get("files", {})
        paths, bad = _check(state, base["files"])
        checked += paths
        problems += bad
    else:
        problems.append(f"base model {base_sha[:16]}…: not registered in the journal")
    return {
        "version": version,
        "head": queries.head_version(journal),
        "lineage": lineage,
        "base_model": base,
        "config": lineage[0]["config"],
        "seed": lineage[0]["seed"],
        "verification": {"ok": not problems, "checked": len(checked), "problems": problems},
    }
