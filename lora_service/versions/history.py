"""What `versions`, `loss` and `audit` show: plain dicts read from the journal. No torch.

Everything here is a query over the projection tables (and, for the audit, the events
themselves), so the answers are exactly what the journal proves; the only files read are the
ones the audit re-hashes to check them against the journaled sha256s.

Steps: a version's `step` is the global step at its end (counted across the lineage), `steps`
is its own run's; its run covered global steps `step - steps + 1 … step`. The loss curve of a
version is the curve of its lineage: its ancestors' runs, then its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_service.journal import Journal, queries
from lora_service.versions.publish import version_files, version_row
from lora_service.versions.verify import verify_version_files

# the events an audit lists for each version in the lineage
RUN_EVENTS = ("RunStarted", "CheckpointSaved", "RunResumed", "RunFailed")
VERSION_EVENTS = (
    "VersionCreated", "HeadMoved", "VersionHeld", "VersionExported", "SamplesRendered",
    "VersionImported",
)


def _loads(value: str | None, default: Any) -> Any:
    return json.loads(value) if value else default


# -- versions --------------------------------------------------------------------------------


def _version_dict(row: dict[str, Any], head: str | None, in_lineage: set[str]) -> dict[str, Any]:
    name = row["version"]
    held = bool(row["held"])
    return {
        "version": name,
        "parent": row["parent"],
        "created_at": row["created_at"],
        "run_id": row["run_id"],
        "batches": _loads(row["batches"], []),
        "new_batches": _loads(row["new_batches"], []),
        "images": row["images"],
        "step": row["step"],
        "steps": row["steps"],
        "start_step": (row["step"] or 0) - (row["steps"] or 0),
        "train_loss": row["train_loss"],
        "val_loss": row["val_loss"],
        "val_loss_per_batch": _loads(row["val_loss_per_batch"], {}),
        "val_loss_known": row["val_loss_known"],
        "base_sha256": row["base_sha256"],
        "head": name == head,
        "in_head_lineage": name in in_lineage,
        "held": held,
        "held_reason": row["held_reason"] if held else None,
    }


def version_rows(journal: Journal) -> list[dict[str, Any]]:
    """Every version, oldest first, with its losses and where it stands relative to the head.

    `head` marks the head; `in_head_lineage` the head and its ancestors (what the next run
    builds on); `held` a version the promotion gate (or a manual gate) kept off the head."""
    head = queries.head_version(journal)
    in_lineage = set(queries.lineage(journal, head))
    rows = journal.query("SELECT * FROM versions ORDER BY created_seq")
    return [_version_dict(row, head, in_lineage) for row in rows]


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


def loss_series(journal: Journal, version: str | None = None) -> dict[str, Any]:
    """Losses of a lineage: `version`'s (the head's when None), oldest version first.

    Returns `{"version", "lineage", "versions", "points"}`: `versions` holds each lineage
    version's train/validation losses and step range; `points` every logged train loss of
    their runs (`step` is global), plus, when `version` is None, the points of a run now
    training on top of the head (`version` null). A step logged twice (a run resumed from a
    checkpoint re-logs the steps after it) keeps the later point: it is the one that counts."""
    if version is not None:
        version_row(journal, version)  # UsageError for an unknown version
    target = version if version is not None else queries.head_version(journal)
    chain = list(reversed(queries.lineage(journal, target)))  # oldest first
    all_rows = {r["version"]: r for r in version_rows(journal)}
    versions = [all_rows[name] for name in chain]
    runs = {r["run_id"]: r["version"] for r in versions}
    if version is None:
        running = queries.running_run(journal)
        if running and running["parent"] == target and running["run_id"] not in runs:
            runs[running["run_id"]] = None
    points: dict[tuple[str, int], dict[str, Any]] = {}
    if runs:
        marks = ", ".join("?" for _ in runs)
        for row in journal.query(
            "SELECT seq, run_id, step, loss, lr, images_per_s FROM loss_points"
            f" WHERE run_id IN ({marks}) ORDER BY seq",
            list(runs),
        ):
            points[(row["run_id"], row["step"])] = {**row, "version": runs[row["run_id"]]}
    ordered = sorted(points.values(), key=lambda p: (p["step"], p["seq"]))
    return {
        "version": target,
        "lineage": chain,
        "versions": [
            {k: v[k] for k in ("version", "parent", "run_id", "start_step", "step", "steps",
                               "train_loss", "val_loss", "val_loss_per_batch", "val_loss_known",
                               "head", "held")}
            for v in versions
        ],
        "points": ordered,
    }


# -- audit -----------------------------------------------------------------------------------


def _event_rows(journal: Journal, where: str, params: list[Any]) -> list[dict[str, Any]]:
    rows = journal.query(
        f"SELECT seq, ts, type, payload, hash FROM events WHERE {where} ORDER BY seq", params
    )
    out = []
    for row in rows:
        payload = json.loads(row["payload"])
        out.append({"seq": row["seq"], "ts": row["ts"], "type": row["type"], "hash": row["hash"],
                    "payload": payload})
    return out


def _events_of(journal: Journal, run_id: str, version: str) -> list[dict[str, Any]]:
    """The events that made `version` (its run's life) and what happened to it since."""
    run_types = ", ".join(f"'{t}'" for t in RUN_EVENTS)
    version_types = ", ".join(f"'{t}'" for t in VERSION_EVENTS)
    return _event_rows(
        journal,
        f"(type IN ({run_types}) AND json_extract(payload, '$.run_id') = ?)"
        f" OR (type IN ({version_types}) AND json_extract(payload, '$.version') = ?)",
        [run_id, version],
    )


def _batch_record(journal: Journal, batch_id: str, new: bool) -> dict[str, Any]:
    batch = journal.query("SELECT * FROM batches WHERE batch_id = ?", [batch_id])
    images = journal.query(
        "SELECT file, sha256, caption, caption_source, width, height FROM batch_images"
        " WHERE batch_id = ? ORDER BY file",
        [batch_id],
    )
    accepted = _event_rows(
        journal, "type = 'BatchAccepted' AND json_extract(payload, '$.batch_id') = ?", [batch_id]
    )
    return {
        "batch_id": batch_id,
        "name": batch[0]["name"] if batch else None,
        "new": new,
        "accepted_seq": accepted[0]["seq"] if accepted else None,
        "accepted_hash": accepted[0]["hash"] if accepted else None,
        "images": images,
    }


def _check(state: Path, files: dict[str, str]) -> tuple[list[str], list[str]]:
    """(paths checked, problems) for a {state-relative path: sha256} map."""
    return sorted(files), verify_version_files(state, files)


def _batch_files(journal: Journal, batch_id: str, images: list[dict[str, Any]]) -> dict[str, str]:
    """Every journaled file of a batch (images and captions), images by their record's hash."""
    prefix = f"batches/{batch_id}/"
    files = {
        r["path"]: r["sha256"]
        for r in journal.query(
            "SELECT path, sha256 FROM files WHERE path LIKE ? AND NOT released",
            [prefix.replace("%", r"\%") + "%"],
        )
    }
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
        run = journal.query("SELECT * FROM runs WHERE run_id = ?", [row["run_id"]])
        run = run[0] if run else {}
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
            "config": _loads(run.get("config"), {}),
            "files": files,
            # an adapter trained elsewhere: origin name, format, file sha256, geometry
            "imported": queries.imported(journal, name),
            "batches": batches,
            "events": _events_of(journal, row["run_id"], name),
        })
    base_sha = rows[version]["base_sha256"]
    base_rows = journal.query("SELECT * FROM base_models WHERE sha256 = ?", [base_sha])
    base: dict[str, Any] = {"sha256": base_sha, "spec": None, "path": None, "kind": None,
                            "seq": None, "hash": None, "files": {}}
    if base_rows:
        registered = _event_rows(journal, "seq = ?", [base_rows[0]["seq"]])
        base |= {k: base_rows[0][k] for k in ("spec", "path", "kind", "seq")}
        if registered:
            base["hash"] = registered[0]["hash"]
            base["files"] = registered[0]["payload"].get("files", {})
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



# -- the chart -------------------------------------------------------------------------------


def plot_loss(series: dict[str, Any], out: Path, *, width: int = 1200, height: int = 600) -> Path:
    """Write `series` (`loss_series` output) as a PNG of `width`×`height` pixels, atomically.

    Train loss over global steps, one colour per version, a dashed line where each version
    ends (labelled with its name) and each version's validation loss as a diamond at its last
    step, so a rise after a new batch (forgetting) is visible at a glance. matplotlib is
    imported here, with the Agg backend, so the CLI does not pay for it otherwise."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from lora_service.errors import ServiceError, UsageError
    from lora_service.store import atomic_write_bytes

    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such folder for --plot")
    if not series["lineage"] and not series["points"]:
        raise ServiceError("nothing to plot: no version has been trained yet")
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    names = [v["version"] for v in series["versions"]]
    if any(p["version"] is None for p in series["points"]):
        names.append(None)
    for i, name in enumerate(names):
        pts = [p for p in series["points"] if p["version"] == name]
        if pts:
            ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], marker="o",
                    markersize=3, linewidth=1.5, color=colours(i % 10),
                    label=f"train loss {name or '(training now)'}")
    val = [v for v in series["versions"] if v["val_loss"] is not None]
    if val:
        ax.plot([v["step"] for v in val], [v["val_loss"] for v in val], linestyle="--",
                marker="D", markersize=7, color="black", label="validation loss (per version)")
    from matplotlib.transforms import blended_transform_factory

    above = blended_transform_factory(ax.transData, ax.transAxes)
    for i, v in enumerate(series["versions"]):
        # each version's steps as a shaded band, its name above the plot where it ends
        if i % 2 == 0:
            ax.axvspan(v["start_step"], v["step"], color="grey", alpha=0.08, linewidth=0)
        ax.axvline(v["step"], color="grey", linestyle=":", linewidth=1)
        ax.text(v["step"], 1.01, v["version"] + (" (head)" if v["head"] else ""),
                transform=above, ha="center", va="bottom", fontsize=9, color="dimgrey")
    target = series["version"]
    ax.set_title(f"Loss over the lineage of {target}" if target else "Loss", fontsize=13,
                 pad=20)
    ax.set_xlabel("global step", fontsize=11)
    ax.set_ylabel("loss (noise-prediction MSE)", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(out, buffer.getvalue())
    return out
