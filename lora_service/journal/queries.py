"""Read-side questions answered from the projection tables (no torch, no writes).

Facts that depend on more than one row — the head's lineage, whether a batch is pending or out
of the lineage after a rollback — are derived here at query time rather than stored, so a
rollback never has to rewrite earlier rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lora_service.journal.sqlite import LOSS_INDEX, Journal


@dataclass(frozen=True)
class Head:
    """Where the head stands: what the last `HeadMoved` said."""

    version: str
    previous: str | None
    reason: str
    moved_by: str  # promotion | rollback | promote
    seq: int
    ts: str


def head(journal: Journal) -> Head | None:
    rows = journal.query(
        "SELECT version, previous, reason, moved_by, seq, ts FROM head WHERE id = 1")
    return Head(**rows[0]) if rows else None


def head_version(journal: Journal) -> str | None:
    """Which version is the head (None before the first): the package asks only this."""
    row = head(journal)
    return row.version if row else None


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
    seen: set[str] = set()  # a set: `in chain` made a lineage of 3,000 versions take 80 ms
    while name is not None and name in parents and name not in seen:
        chain.append(name)
        seen.add(name)
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


def loads(value: str | None, default: Any = None) -> Any:
    """A JSON column's value; `default` for NULL or empty."""
    return json.loads(value) if value else default


# -- versions and runs -------------------------------------------------------------------------


def run(journal: Journal, run_id: str) -> dict[str, Any] | None:
    rows = journal.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
    return rows[0] if rows else None


def version_names(journal: Journal) -> list[str]:
    """Every version name, oldest first."""
    return [r["version"] for r in journal.query("SELECT version FROM versions ORDER BY 1")]


def base_model(journal: Journal, sha256: str) -> dict[str, Any] | None:
    """The `base_models` row (kind, path, ...) registered with this sha256."""
    rows = journal.query("SELECT * FROM base_models WHERE sha256 = ?", [sha256])
    return rows[0] if rows else None


def files_under(journal: Journal, folder: str) -> bool:
    """Whether the journal records any file in `folder` (state-relative)."""
    return bool(journal.query("SELECT 1 AS x FROM files WHERE path LIKE ? LIMIT 1",
                              [f"{folder}/%"]))


def live_file(journal: Journal, path: str) -> str | None:
    """The sha256 of a journaled, not released file at `path`."""
    rows = journal.query("SELECT sha256 FROM files WHERE path = ? AND released = 0", [path])
    return rows[0]["sha256"] if rows else None


def batches_of(journal: Journal, versions: list[str]) -> list[str]:
    """The batches the given versions trained on, sorted."""
    if not versions:
        return []
    marks = ", ".join("?" for _ in versions)
    return [r["batch_id"] for r in journal.query(
        f"SELECT DISTINCT batch_id FROM version_batches WHERE version IN ({marks})"
        " ORDER BY batch_id", versions)]


def captions_by_image(journal: Journal, shas: list[str]) -> list[dict[str, Any]]:
    """(name: the batch's name, batch_id, sha256, caption) of every accepted image with one
    of these sha256s, by batch and file."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(shas), 500):
        chunk = shas[start : start + 500]
        out += journal.query(
            "SELECT b.name AS name, i.batch_id AS batch_id, i.sha256 AS"
            " sha256, i.caption AS caption FROM batch_images i LEFT JOIN batches b ON"
            f" b.batch_id = i.batch_id WHERE i.sha256 IN ({', '.join('?' for _ in chunk)})"
            " ORDER BY i.batch_id, i.file",
            chunk,
        )
    return out


# -- the daemon's questions --------------------------------------------------------------------


def base_registered(journal: Journal, spec: str) -> str | None:
    """The sha256 last registered for this base model spec, None when it never was."""
    rows = journal.query(
        "SELECT sha256 FROM base_models WHERE spec = ? ORDER BY seq DESC LIMIT 1", [spec])
    return rows[0]["sha256"] if rows else None


def failures_counted(journal: Journal, run_id: str, not_prefix: str) -> int:
    """The run's `RunFailed` events whose reason does not start with `not_prefix` (the disk's
    failures are not the run's)."""
    rows = journal.query(
        "SELECT count(*) AS n FROM events WHERE type = 'RunFailed'"
        " AND json_extract(payload, '$.run_id') = ?"
        " AND substr(json_extract(payload, '$.reason'), 1, ?) != ?",
        [run_id, len(not_prefix), not_prefix],
    )
    return int(rows[0]["n"])


@dataclass(frozen=True)
class Failure:
    """A `RunFailed` event: where it is, and why the run failed."""

    seq: int
    reason: str


def last_failure(journal: Journal, run_id: str, since: int) -> Failure | None:
    """The run's last `RunFailed` after seq `since`."""
    rows = journal.query(
        "SELECT seq, json_extract(payload, '$.reason') AS reason FROM events"
        " WHERE type = 'RunFailed' AND seq > ? AND json_extract(payload, '$.run_id') = ?"
        " ORDER BY seq DESC LIMIT 1",
        [since, run_id],
    )
    return Failure(rows[0]["seq"], rows[0]["reason"]) if rows else None


def runs_with_status(journal: Journal, status: str) -> list[str]:
    """Run ids with this status, oldest first."""
    return [r["run_id"] for r in journal.query(
        "SELECT run_id FROM runs WHERE status = ? ORDER BY started_seq", [status])]


def open_requests(journal: Journal, after: int) -> list[tuple[int, bool]]:
    """(seq, fresh) of the training requests after seq `after` that no run answered yet."""
    return [(r["seq"], bool(r["fresh"])) for r in journal.query(
        "SELECT seq, fresh FROM requests WHERE run_id IS NULL AND seq > ? ORDER BY seq",
        [after])]


def run_count(journal: Journal) -> int:
    return int(journal.query("SELECT count(*) AS n FROM runs")[0]["n"])


# -- status and batches ---------------------------------------------------------------------------


def images_per_s(journal: Journal, run_id: str) -> float | None:
    """The run's mean training speed over its logged steps."""
    rows = journal.query(
        "SELECT avg(images_per_s) AS r FROM loss_points WHERE run_id = ?", [run_id])
    return rows[0]["r"] if rows else None


@dataclass(frozen=True)
class FailedRun:
    """A run that failed (retried after a back-off) or gave up."""

    run_id: str
    last_error: str | None
    failures: int | None
    status: str  # failed | gave_up
    ended_at: str | None


def last_failed_run(journal: Journal) -> FailedRun | None:
    """The newest failed or given-up run."""
    rows = journal.query(
        "SELECT run_id, last_error, failures, status, ended_at FROM runs"
        " WHERE status IN ('failed', 'gave_up') ORDER BY started_seq DESC LIMIT 1"
    )
    return FailedRun(**rows[0]) if rows else None


@dataclass(frozen=True)
class HeldVersion:
    version: str
    reason: str | None  # why a gate kept it off the head


def held_versions(journal: Journal) -> list[HeldVersion]:
    """Every held version, newest first."""
    rows = journal.query(
        "SELECT version, held_reason FROM versions WHERE held = 1 ORDER BY created_seq DESC"
    )
    return [HeldVersion(r["version"], r["held_reason"]) for r in rows]


@dataclass(frozen=True)
class Batch:
    """An accepted batch (its `batches` row, caption sources decoded)."""

    batch_id: str
    name: str
    images: int
    caption_sources: tuple[str, ...]
    accepted_seq: int
    accepted_at: str


def _batch(row: dict[str, Any]) -> Batch:
    return Batch(row["batch_id"], row["name"], row["images"],
                 tuple(json.loads(row["caption_sources"] or "[]")), row["accepted_seq"],
                 row["accepted_at"])


def batch(journal: Journal, batch_id: str) -> Batch | None:
    rows = journal.query("SELECT * FROM batches WHERE batch_id = ?", [batch_id])
    return _batch(rows[0]) if rows else None


def batch_rows(journal: Journal) -> dict[str, Batch]:
    """batch_id -> its accepted batch."""
    return {row["batch_id"]: _batch(row) for row in journal.query("SELECT * FROM batches")}


@dataclass(frozen=True)
class IntakeDecision:
    """One intake event about an inbox folder (its `intakes` row, `bad` and `notes` decoded)."""

    seq: int
    ts: str
    name: str  # the folder's name in the inbox
    outcome: str  # detected | accepted | rejected | duplicate
    batch_id: str | None
    reason: str | None
    bad: tuple[dict[str, Any], ...]  # {file, reason} of each file left out
    notes: tuple[str, ...]
    moved_to: str | None  # inbox-relative: .accepted/<name>, .rejected/<name>


def _intake(row: dict[str, Any]) -> IntakeDecision:
    return IntakeDecision(row["seq"], row["ts"], row["name"], row["outcome"], row["batch_id"],
                          row["reason"], tuple(json.loads(row["bad"] or "[]")),
                          tuple(json.loads(row["notes"] or "[]")), row["moved_to"])


def decided_intakes(journal: Journal) -> list[IntakeDecision]:
    """Every intake decision (accepted, rejected, duplicate), in journal order."""
    rows = journal.query(
        "SELECT * FROM intakes WHERE outcome IN ('accepted', 'rejected', 'duplicate')"
        " ORDER BY seq"
    )
    return [_intake(row) for row in rows]


def last_intake(journal: Journal, name: str) -> IntakeDecision | None:
    """The newest intake event of an inbox folder name."""
    rows = journal.query("SELECT * FROM intakes WHERE name = ? ORDER BY seq DESC LIMIT 1",
                         [name])
    return _intake(rows[0]) if rows else None


def batch_image_shas(journal: Journal, batch_id: str) -> set[str]:
    return {r["sha256"] for r in journal.query(
        "SELECT sha256 FROM batch_images WHERE batch_id = ?", [batch_id])}


# -- history and audit ----------------------------------------------------------------------------


def versions(journal: Journal) -> list[dict[str, Any]]:
    """Every `versions` row, oldest first."""
    return journal.query("SELECT * FROM versions ORDER BY created_seq")


@dataclass(frozen=True)
class Fact:
    """A journaled event as an audit cites it."""

    seq: int
    ts: str
    type: str
    hash: str
    payload: dict[str, Any]


def event_records(journal: Journal, *, seq: int | None = None, run_id: str | None = None,
                  version: str | None = None, batch_id: str | None = None,
                  run_types: tuple[str, ...] = (), version_types: tuple[str, ...] = (),
                  ) -> list[Fact]:
    """The events asked for, in order: the event at `seq`;
    or those of `run_types` about `run_id` and of `version_types` about `version`; or the
    `BatchAccepted` of `batch_id`."""
    where: list[str] = []
    params: list[Any] = []
    if seq is not None:
        where.append("seq = ?")
        params.append(seq)
    if run_types:
        where.append(f"(type IN ({', '.join('?' for _ in run_types)})"
                     " AND json_extract(payload, '$.run_id') = ?)")
        params += [*run_types, run_id]
    if version_types:
        where.append(f"(type IN ({', '.join('?' for _ in version_types)})"
                     " AND json_extract(payload, '$.version') = ?)")
        params += [*version_types, version]
    if batch_id is not None:
        where.append("(type = 'BatchAccepted' AND json_extract(payload, '$.batch_id') = ?)")
        params.append(batch_id)
    if not where:
        return []
    rows = journal.query(
        f"SELECT seq, ts, type, payload, hash FROM events WHERE {' OR '.join(where)}"
        " ORDER BY seq", params)
    return [Fact(r["seq"], r["ts"], r["type"], r["hash"], json.loads(r["payload"]))
            for r in rows]


def batch_image_records(journal: Journal, batch_id: str) -> list[dict[str, Any]]:
    """(file, sha256, caption, caption_source, width, height) of a batch's images, by file."""
    return journal.query(
        "SELECT file, sha256, caption, caption_source, width, height FROM batch_images"
        " WHERE batch_id = ? ORDER BY file",
        [batch_id],
    )


def live_files_under(journal: Journal, folder: str) -> dict[str, str]:
    """path -> sha256 of every journaled, not released file under `folder/`."""
    prefix = folder.rstrip("/") + "/"
    return {r["path"]: r["sha256"] for r in journal.query(
        "SELECT path, sha256 FROM files WHERE path LIKE ? AND NOT released",
        [prefix.replace("%", r"\%") + "%"])}


# -- planning ------------------------------------------------------------------------------------


def batch_images(journal: Journal, batch_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """batch_id -> its image rows (file, sha256, caption, ...), in file order."""
    out: dict[str, list[dict[str, Any]]] = {b: [] for b in batch_ids}
    if not batch_ids:
        return out
    marks = ", ".join("?" for _ in batch_ids)
    for row in journal.query(
        f"SELECT * FROM batch_images WHERE batch_id IN ({marks}) ORDER BY batch_id, file",
        batch_ids,
    ):
        out[row["batch_id"]].append(row)
    return out


def image_shas_by_batch(journal: Journal) -> dict[str, list[str]]:
    """batch_id -> the sha256 of each of its accepted images."""
    shas: dict[str, list[str]] = {}
    for row in journal.query("SELECT batch_id, sha256 FROM batch_images"):
        shas.setdefault(row["batch_id"], []).append(row["sha256"])
    return shas


def lineage_batches(journal: Journal, versions: list[str]) -> list[str]:
    """The batches the given versions trained on, in the order they were accepted."""
    if not versions:
        return []
    marks = ", ".join("?" for _ in versions)
    rows = journal.query(
        f"SELECT DISTINCT vb.batch_id FROM version_batches vb JOIN batches b"
        f" ON b.batch_id = vb.batch_id WHERE vb.version IN ({marks}) ORDER BY b.accepted_seq",
        versions,
    )
    return [r["batch_id"] for r in rows]


def version_run_config(journal: Journal, version: str) -> dict[str, Any]:
    """The effective config recorded by the run that made `version` ({} for an import)."""
    rows = journal.query(
        "SELECT r.config FROM versions v JOIN runs r ON r.run_id = v.run_id WHERE v.version = ?",
        [version],
    )
    return json.loads(rows[0]["config"]) if rows and rows[0]["config"] else {}


# -- the loss curve ----------------------------------------------------------------------------
# A lineage's curve is the `loss_points` of its runs (oldest first; a run now training on top
# of it last), by global step: each run covers the steps after its parent's. A step logged
# twice (a run resumed from a checkpoint re-logs the steps after it) keeps the later point: it
# is the one that counts. Only a resumed run (`runs.resumed_seq`) logs a step twice.

LOSS_POINTS = 2000  # the most points `loss_curve` returns by default: what a chart can show
_POINT = "seq, run_id, step, loss, lr, images_per_s"
_IN_RUNS = "run_id IN (SELECT value FROM json_each(?))"


@dataclass(frozen=True)
class LossCurve:
    """A lineage's loss points by step: all of them, or the extremes of equal step ranges."""

    points: list[dict[str, Any]]  # seq, run_id, step, loss, lr, images_per_s, version
    total: int  # points of the whole curve
    buckets: int | None = None  # None: `points` is the whole curve
    bucket_steps: int | None = None

    def downsampled(self) -> dict[str, Any] | None:
        """How `points` were chosen when they are not the whole curve (None when they are)."""
        if self.buckets is None:
            return None
        return {"method": "min-max", "total_points": self.total, "buckets": self.buckets,
                "bucket_steps": self.bucket_steps}


def loss_versions(journal: Journal) -> dict[str, dict[str, Any]]:
    """Every version's row by name, with only the columns `loss` shows (a `SELECT *` of 3,000
    versions and their batch lists took a tenth of the command)."""
    return {r["version"]: r for r in journal.query(
        "SELECT version, parent, run_id, step, steps, train_loss, val_loss,"
        " val_loss_per_batch, val_loss_known, held FROM versions")}


def loss_points(journal: Journal,
                runs: Sequence[tuple[str, str | None]]) -> Iterator[dict[str, Any]]:
    """Every point of the curve of `runs` ((run_id, version) pairs), by step, one at a time."""
    labels = dict(runs)
    if not labels:
        return
    rows = journal.iter_query(
        f"SELECT {_POINT} FROM loss_points WHERE {_IN_RUNS} ORDER BY step, seq",
        [json.dumps(list(labels))])
    step: int | None = None
    group: list[dict[str, Any]] = []  # the points at `step`, by seq
    for row in rows:
        if row["step"] != step:
            yield from _last_of_each_run(group, labels)
            step, group = row["step"], []
        group.append(row)
    yield from _last_of_each_run(group, labels)


def _last_of_each_run(group: list[dict[str, Any]],
                      labels: dict[str, str | None]) -> list[dict[str, Any]]:
    """Of points at one step (by seq), each run's last, by seq, with its version."""
    if len(group) == 1:
        return [group[0] | {"version": labels[group[0]["run_id"]]}]
    kept = {row["run_id"]: row for row in group}
    return [row | {"version": labels[row["run_id"]]}
            for row in sorted(kept.values(), key=lambda p: p["seq"])]


def loss_curve(journal: Journal, runs: Sequence[tuple[str, str | None]],
               points: int = LOSS_POINTS) -> LossCurve:
    """The curve of `runs` in at most `points` points (at least 3): the whole curve when it has
    no more, else its step range cut into `points // 2` equal buckets (`// 3` when a loss is
    NaN, which SQLite stores as NULL), each giving its lowest and its highest loss point (and
    its first NaN one). Min-max keeps every spike and dip a chart of that many points can show
    (a sample or an average per bucket would drop them) and needs no sort: two scans of
    `LOSS_INDEX` per run and bucket, inside SQLite (0.3 s for a million points)."""
    labels = dict(runs)
    runs_json = json.dumps(list(labels))
    indexed = bool(journal.query(
        "SELECT 1 AS x FROM sqlite_master WHERE type = 'index' AND name = ?", [LOSS_INDEX]))
    if indexed:  # index seeks and counts, per run
        stats = [r for r in journal.query(
            "SELECT r.value AS run_id,"
            " (SELECT count(*) FROM loss_points WHERE run_id = r.value) AS n,"
            " (SELECT min(step) FROM loss_points WHERE run_id = r.value) AS first,"
            " (SELECT max(step) FROM loss_points WHERE run_id = r.value) AS last"
            " FROM json_each(?) AS r", [runs_json]) if r["n"]]
    else:  # one scan of the table, rather than one per run
        stats = journal.query(
            "SELECT run_id, count(*) AS n, min(step) AS first, max(step) AS last"
            f" FROM loss_points WHERE {_IN_RUNS} GROUP BY run_id", [runs_json])
    resumed = {r["run_id"] for r in journal.query(
        f"SELECT run_id FROM runs WHERE resumed_seq IS NOT NULL AND {_IN_RUNS}", [runs_json])}
    resumed &= {r["run_id"] for r in stats}
    total = sum(r["n"] for r in stats)
    if resumed:  # less the points logged again
        total -= sum(r["n"] for r in journal.query(
            "SELECT count(*) - count(DISTINCT step) AS n FROM loss_points"
            f" WHERE {_IN_RUNS} GROUP BY run_id", [json.dumps(sorted(resumed))]))
    points = max(points, 3)
    if total <= points:
        return LossCurve(list(loss_points(journal, runs)), total)
    lo, hi = min(r["first"] for r in stats), max(r["last"] for r in stats)
    if not indexed:
        return _loss_extremes_streamed(journal, runs, total, lo, hi, points)
    for per_bucket in (2, 3):  # 3 if a loss is NaN: the first pass finds one as a highest
        width = -(-(hi - lo + 1) // (points // per_bucket))
        seqs = _segment_extremes(journal, stats, resumed, lo, width, nan=per_bucket == 3)
        candidates = journal.query(
            f"SELECT {_POINT} FROM loss_points WHERE seq IN (SELECT value FROM json_each(?))",
            [json.dumps(sorted(seqs))])
        if all(p["loss"] is not None for p in candidates):
            break
    return _extremes(candidates, labels, total, lo, width, (hi - lo) // width + 1)


def _segment_extremes(journal: Journal, stats: list[dict[str, Any]], resumed: set[str], lo: int,
                      width: int, nan: bool) -> set[int]:
    """The seqs of the lowest and the highest loss point of each run in each bucket: with
    `nan`, of the highest that is not NaN and of the first NaN one; without, a NaN counts as
    highest (so one is found)."""
    segments: dict[bool, list[tuple[str, int, int]]] = {False: [], True: []}
    for r in stats:  # each run's steps within each bucket
        for k in range((r["first"] - lo) // width, (r["last"] - lo) // width + 1):
            start, end = lo + k * width, lo + (k + 1) * width - 1
            segments[r["run_id"] in resumed].append(
                (r["run_id"], max(r["first"], start), min(r["last"], end)))
    seqs: set[int] = set()
    for exact, chosen in segments.items():
        if not chosen:
            continue
        within = ("run_id = json_extract(s.value, '$[0]') AND step BETWEEN"
                  " json_extract(s.value, '$[1]') AND json_extract(s.value, '$[2]')")
        if exact:  # not a point its run logged again later
            within += (" AND NOT EXISTS (SELECT 1 FROM loss_points AS later WHERE"
                       " later.run_id = p.run_id AND later.step = p.step AND later.seq > p.seq)")
        # one row per segment: min() and max() take the seq of their first row (earliest step)
        pick = "(SELECT seq FROM (SELECT seq, {} FROM loss_points AS p WHERE {}{}))"
        columns = [pick.format("min(loss)", within, " AND loss IS NOT NULL"),
                   pick.format("max(loss)", within, " AND loss IS NOT NULL") if nan else
                   pick.format("max(coalesce(loss, 9e999))", within, "")]
        if nan:
            columns.append(f"(SELECT seq FROM loss_points AS p WHERE {within} AND loss IS NULL"
                           " ORDER BY step LIMIT 1)")
        for row in journal.iter_query(
            f"SELECT {', '.join(f'{c} AS c{i}' for i, c in enumerate(columns))}"
            " FROM json_each(?) AS s", [json.dumps(chosen)]
        ):
            seqs.update(seq for seq in row.values() if seq is not None)
    return seqs


def _extremes(candidates: Iterator[dict[str, Any]] | list[dict[str, Any]],
              labels: dict[str, str | None], total: int, lo: int, width: int,
              buckets: int) -> LossCurve:
    """Per bucket, the lowest and the highest loss (the earliest of equals) and the first NaN
    of `candidates` (points of the curve), by step."""
    low: dict[int, dict[str, Any]] = {}
    high: dict[int, dict[str, Any]] = {}
    nan: dict[int, dict[str, Any]] = {}
    for point in candidates:
        k = (point["step"] - lo) // width
        if point["loss"] is None:
            if k not in nan or (point["step"], point["seq"]) < (nan[k]["step"], nan[k]["seq"]):
                nan[k] = point
            continue
        if k not in low or (point["loss"], point["step"]) < (low[k]["loss"], low[k]["step"]):
            low[k] = point
        if k not in high or (-point["loss"], point["step"]) < (-high[k]["loss"], high[k]["step"]):
            high[k] = point
    chosen = {p["seq"]: p for group in (low, high, nan) for p in group.values()}
    points = [p | {"version": labels[p["run_id"]]}
              for p in sorted(chosen.values(), key=lambda p: (p["step"], p["seq"]))]
    return LossCurve(points, total, buckets, width)


def _loss_extremes_streamed(journal: Journal, runs: Sequence[tuple[str, str | None]],
                            total: int, lo: int, hi: int, points: int) -> LossCurve:
    """`loss_curve` on a journal without `LOSS_INDEX` (schema 2, until a writer opens it): the
    same points, from every point streamed once (a few seconds for a million)."""
    nan = bool(journal.query(
        f"SELECT 1 AS x FROM loss_points WHERE {_IN_RUNS} AND loss IS NULL LIMIT 1",
        [json.dumps([run_id for run_id, _ in runs])]))
    width = -(-(hi - lo + 1) // (points // (3 if nan else 2)))
    low: dict[int, dict[str, Any]] = {}
    high: dict[int, dict[str, Any]] = {}
    first_nan: dict[int, dict[str, Any]] = {}
    for point in loss_points(journal, runs):
        k = (point["step"] - lo) // width
        if point["loss"] is None:
            first_nan.setdefault(k, point)
        else:
            if k not in low or point["loss"] < low[k]["loss"]:
                low[k] = point
            if k not in high or point["loss"] > high[k]["loss"]:
                high[k] = point
    return _extremes([*low.values(), *high.values(), *first_nan.values()], dict(runs), total,
                     lo, width, (hi - lo) // width + 1)


def loss_tail(journal: Journal, runs: Sequence[tuple[str, str | None]],
              count: int) -> list[dict[str, Any]]:
    """The last `count` points of the curve of `runs`, by step (read from its newest run
    back, as far as needed)."""
    tail: list[dict[str, Any]] = []
    for run_id, version in reversed(runs):
        steps: set[int] = set()
        rows = journal.iter_query(
            f"SELECT {_POINT} FROM loss_points WHERE run_id = ? ORDER BY step DESC, seq DESC",
            [run_id])
        try:
            for row in rows:
                if len(tail) == count:
                    return tail[::-1]
                if row["step"] not in steps:
                    steps.add(row["step"])
                    tail.append(row | {"version": version})
        finally:
            rows.close()
    return tail[::-1]


def judged(journal: Journal) -> dict[str, dict[str, dict[str, float]]]:
    """version -> the judge's scores of its latest samples, when that render succeeded and its
    base ships a judge (others are absent)."""
    rows = journal.query("SELECT s.version, e.payload FROM samples s JOIN events e ON "
                         "e.seq = s.seq WHERE s.error IS NULL")
    out = {r["version"]: json.loads(r["payload"]).get("judged") for r in rows}
    return {v: scores for v, scores in out.items() if scores}
