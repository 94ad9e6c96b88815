"""The intake flow: a complete inbox folder -> checked files -> store -> journal -> move.

Completeness. A folder is complete when it holds the `inbox.ready_marker` file, or when nothing
in it changed for `inbox.settle_seconds`. "Changed" compares a fingerprint of the folder's
entries (name, type, size, mtime, ctime) with the one seen at the previous scan; on the first
sighting (e.g. the start-up rescan) the entries' own ctimes stand in for "last seen changing".
ctime is used because a copier cannot set it: `cp -p` and `rsync -a` backdate mtime, but every
write, rename or chmod bumps ctime to the kernel's clock, so a file still being written always
looks recent. A folder with no entries at all is not a batch yet (a `mkdir` before the copy).

Order of effects, chosen so that a SIGKILL anywhere leaves something the next scan finishes:
1. `BatchDetected` (once per arrival: skipped while the latest intake row of that name is a
   detection, or a decision whose move is still to be done).
2. Every file is checked; good images are written (fsynced) into `state/batches/.incoming-*`.
3. Accepted: captions are written as sidecars there, the folder is renamed to
   `state/batches/<batch_id>/` (it appears complete or not at all), then `BatchAccepted` (with
   `CaptionsGenerated` when the labeller captioned, in the same transaction), then the inbox
   folder moves to `.accepted/<name>`. Duplicate: `BatchDuplicate`, then the move. Rejected:
   `REJECTED.txt` is written into the inbox folder, then `BatchRejected`, then the move to
   `.rejected/<name>`.
At the first scan of a process (and after a failed batch), dot-folders in `state/batches/` (a
killed intake's temp) and folders without a `BatchAccepted` (stored, then killed before the
journal) are removed: the inbox still holds their originals, so the batch is redone. A folder
still in the inbox whose latest intake row is a decision whose `moved_to` does not exist yet,
that has not changed since (ctime) and whose files still match that decision, only lacks its
move: the move is done and nothing is journaled twice. Nothing in the inbox is ever deleted.

`scan()` must only run in the process that holds the state lock (the daemon, or a foreground
command): it is the only writer of `state/batches/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import structlog

from lora_service.config import Config
from lora_service.inbox.captions import (
    MAX_CAPTION_FILE_BYTES,
    METADATA,
    Metadata,
    UnreadableFile,
    check_caption,
    decode_caption,
    read_metadata,
    read_regular,
)
from lora_service.inbox.validate import (
    Checked,
    Limits,
    allowed_formats,
    check_image,
    write_synced,
)
from lora_service.journal import Journal
from lora_service.journal import events as ev
from lora_service.store import atomic_write_bytes, fsync_dir, sha256_bytes, sha256_file

log = structlog.get_logger(__name__)

ACCEPTED = ".accepted"
REJECTED = ".rejected"
REPORT = "REJECTED.txt"
BATCH_ID_HEX = 16
FINAL = ("accepted", "rejected", "duplicate")
# ctime (kernel clock) vs event time (our clock): tolerance for coarse timestamps
CLOCK_SLACK_S = 1.0
# Fault injection for the crash tests: SIGKILL ourselves at a named point of the flow.
CRASH_ENV = "LORA_SERVICE_INTAKE_CRASH_AT"
DELAY_ENV = "LORA_SERVICE_TEST_INTAKE_DELAY"  # tests only: seconds a batch takes at least

Labeller = Callable[[list[Path]], dict[str, str]]
"""Captions for images that have none: called with the stored copies' paths, returns
{file name: caption}. Optional attributes `model` and `weights_sha256` are journaled."""


@dataclass(frozen=True)
class Outcome:
    """What one scan did with one batch folder."""

    name: str
    status: Literal["accepted", "rejected", "duplicate"]
    moved_to: str  # inbox-relative, e.g. .accepted/cats-1
    batch_id: str | None = None
    images: int = 0
    bad: tuple[ev.BadFile, ...] = ()
    seq: int | None = None  # the deciding event (None: decided by an earlier run)
    finished: bool = False  # True: only the move was left from an interrupted intake

    @property
    def kind(self) -> str:
        """Same as `status` (the daemon's log line reads it under this name)."""
        return self.status


@dataclass(frozen=True)
class _Good:
    check: Checked
    caption: str
    source: Literal["sidecar", "metadata.csv", "clip"]


@dataclass
class _Verdict:
    good: list[_Good] = field(default_factory=list)
    bad: list[ev.BadFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    generated: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Sighting:
    fingerprint: tuple[Any, ...]
    since: float  # when that fingerprint was first seen (or its newest ctime, at first sight)


def _crash_point(label: str) -> None:
    if os.environ.get(CRASH_ENV) == label:
        os.kill(os.getpid(), signal.SIGKILL)


def batch_id_of(pairs: list[tuple[str, str]]) -> str:
    """Content address of a batch: sha256 over the sorted (image sha256, caption) pairs."""
    blob = json.dumps(sorted(pairs), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:BATCH_ID_HEX]


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)
    fsync_dir(dst.parent)
    fsync_dir(src.parent)


class Intake:
    """Turns complete inbox folders into journaled batches. One instance per daemon process."""

    def __init__(
        self,
        journal: Journal,
        config: Config,
        *,
        labeller: Labeller | None = None,
        workers: int | None = None,
    ) -> None:
        self.journal = journal
        self.config = config
        self.labeller = labeller
        self.inbox = Path(config.paths.inbox)
        self.state = Path(config.paths.state)
        self.store = self.state / "batches"
        self.limits = Limits(
            formats=allowed_formats(config.inbox.allowed_extensions),
            min_side=config.inbox.min_image_side,
            max_pixels=config.inbox.max_image_pixels,
        )
        self.workers = workers or min(4, os.cpu_count() or 1)
        self._seen: dict[str, _Sighting] = {}
        self._lock = threading.Lock()
        self._store_checked = False  # leftovers of a killed run are cleaned at the first scan

    # -- scanning ----------------------------------------------------------------------------

    def scan(self, now: float | None = None) -> list[Outcome]:
        """Look at every batch folder once; process the complete ones; return what happened.

        Safe to call as often as the watcher fires: incomplete folders cost a few stat calls.
        A batch that fails with an unexpected error (e.g. disk full) is logged and retried on
        the next scan; nothing about it is journaled as decided.
        """
        with self._lock:
            self.inbox.mkdir(parents=True, exist_ok=True)
            if not self._store_checked:
                self._clean_store()
                self._store_checked = True
            now = time.time() if now is None else now
            outcomes: list[Outcome] = []
            present: set[str] = set()
            for entry in sorted(os.scandir(self.inbox), key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                if not (entry.is_symlink() or entry.is_dir(follow_symlinks=False)):
                    continue  # a loose file in the inbox root is not a batch
                present.add(entry.name)
                try:
                    outcome = self._visit(entry.name, now)
                except Exception:
                    log.exception("intake failed; retried on the next scan", batch=entry.name)
                    self._seen.pop(entry.name, None)
                    self._store_checked = False
                    continue
                if outcome is not None:
                    outcomes.append(outcome)
            for gone in set(self._seen) - present:
                del self._seen[gone]
            return outcomes

    def _fingerprint(self, folder: Path) -> tuple[tuple[Any, ...], float]:
        """(entries' identity, newest change time) of a folder's direct entries."""
        entries = []
        newest = 0.0
        for entry in os.scandir(folder):
            info = entry.stat(follow_symlinks=False)
            entries.append(
                (entry.name, stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns,
                 info.st_ctime_ns)
            )
            newest = max(newest, info.st_mtime, info.st_ctime)
        return tuple(sorted(entries)), newest

    def _complete(self, name: str, folder: Path, now: float) -> bool | None:
        """True when complete, False while settling, None when it is not a batch yet (empty)."""
        if folder.is_symlink():
            return True  # never read: rejected as it is
        fingerprint, newest = self._fingerprint(folder)
        if not fingerprint:
            return None
        if any(entry[0] == self.config.inbox.ready_marker for entry in fingerprint):
            return True
        seen = self._seen.get(name)
        if seen is None:
            since = min(now, newest)
        elif seen.fingerprint != fingerprint:
            since = now
        else:
            since = seen.since
        self._seen[name] = _Sighting(fingerprint, since)
        return now - since >= self.config.inbox.settle_seconds

    def _visit(self, name: str, now: float) -> Outcome | None:
        folder = self.inbox / name
        last = self._last_intake(name)
        pending = (
            last
            if last is not None
            and last["outcome"] in FINAL
            and not os.path.lexists(self.inbox / last["moved_to"])
            else None
        )
        new_arrival = pending is None and (last is None or last["outcome"] in FINAL)
        complete = self._complete(name, folder, now)
        if complete is None:
            return None
        if new_arrival:
            self.journal.append(ev.BatchDetected(name=name))
        if not complete:
            return None
        self._seen.pop(name, None)
        if pending is not None:
            if self._only_move_missing(pending, folder):
                return self._finish_move(pending)
            self.journal.append(ev.BatchDetected(name=name))
        return self._process(name, folder)

    # -- recovery ----------------------------------------------------------------------------

    def _last_intake(self, name: str) -> dict[str, Any] | None:
        rows = self.journal.query(
            "SELECT * FROM intakes WHERE name = ? ORDER BY seq DESC LIMIT 1", (name,)
        )
        return rows[0] if rows else None

    def _clean_store(self) -> None:
        """Remove what a killed intake left in the store: temp folders and unjournaled batches."""
        if not self.store.is_dir():
            return
        known = {row["batch_id"] for row in self.journal.query("SELECT batch_id FROM batches")}
        for entry in os.scandir(self.store):
            if entry.name.startswith(".") or entry.name not in known:
                log.warning("removing what an interrupted intake left", path=entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)

    def _only_move_missing(self, row: dict[str, Any], folder: Path) -> bool:
        """Is this the folder a journaled decision was about (so only its move is missing)?

        Not if it changed after the decision: a rename (a user moving `.rejected/x` back into
        the inbox after fixing it) or a new entry bumps the folder's ctime past the event's
        time. Then the content must still match: the decided images, or our REJECTED.txt.
        """
        decided = datetime.fromisoformat(row["ts"]).timestamp()
        if folder.lstat().st_ctime > decided + CLOCK_SLACK_S:
            return False
        if row["outcome"] == "rejected":
            return folder.is_symlink() or (folder / REPORT).is_file()
        wanted = {
            r["sha256"]
            for r in self.journal.query(
                "SELECT sha256 FROM batch_images WHERE batch_id = ?", (row["batch_id"],)
            )
        }
        have = set()
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                have.add(sha256_file(Path(entry.path)))
        return bool(wanted) and wanted <= have

    def _finish_move(self, row: dict[str, Any]) -> Outcome:
        _move(self.inbox / row["name"], self.inbox / row["moved_to"])
        bad = tuple(ev.BadFile(**b) for b in json.loads(row["bad"] or "[]"))
        log.info("finished an interrupted move", batch=row["name"], moved_to=row["moved_to"])
        return Outcome(row["name"], row["outcome"], row["moved_to"], row["batch_id"], bad=bad,
                       finished=True)

    def _free_name(self, kind: str, name: str) -> str:
        """`kind/name`, or `kind/name-1`, `-2`, ... : never over an existing folder."""
        candidate, n = name, 0
        while os.path.lexists(self.inbox / kind / candidate):
            n += 1
            candidate = f"{name}-{n}"
        return f"{kind}/{candidate}"

    # -- processing --------------------------------------------------------------------------

    def _process(self, name: str, folder: Path) -> Outcome:
        if folder.is_symlink():
            return self._reject(name, folder, "the batch folder is a symlink (not followed)",
                                _Verdict(), report=False)
        time.sleep(float(os.environ.get(DELAY_ENV) or 0))
        self.store.mkdir(parents=True, exist_ok=True)
        tmp = self.store / f".incoming-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            verdict = self._check(folder, tmp)
            minimum = self.config.inbox.min_images
            if not verdict.good:
                reason = f"no usable image ({len(verdict.bad)} bad files)"
                return self._reject(name, folder, reason, verdict)
            if len(verdict.good) < minimum:
                reason = (f"{len(verdict.good)} usable images, fewer than "
                          f"inbox.min_images = {minimum}")
                return self._reject(name, folder, reason, verdict)
            return self._accept(name, folder, tmp, verdict)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check(self, folder: Path, tmp: Path) -> _Verdict:
        """Check every entry of the folder; good images are copied into `tmp`."""
        cfg = self.config.inbox
        verdict = _Verdict()
        images: list[Path] = []
        texts: set[str] = set()
        has_metadata = False
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name in (cfg.ready_marker, REPORT):
                continue
            if entry.name.startswith("."):
                verdict.notes.append(f"{entry.name}: hidden file ignored")
            elif entry.name == METADATA:
                has_metadata = True
            elif path.suffix.lower() == ".txt":
                texts.add(entry.name)  # read (never through a link) with its image
            elif entry.is_symlink():
                verdict.bad.append(ev.BadFile(file=entry.name, reason=self._symlink(path)))
            elif entry.is_dir(follow_symlinks=False):
                verdict.bad.append(ev.BadFile(
                    file=entry.name, reason="a sub-folder (batches are flat; not read)"))
            elif path.suffix.lower().lstrip(".") in cfg.allowed_extensions:
                images.append(path)
            else:
                ext = path.suffix.lower() or "(none)"
                allowed = ", ".join(cfg.allowed_extensions)
                verdict.bad.append(ev.BadFile(
                    file=entry.name, reason=f"extension {ext} not allowed (allowed: {allowed})"))

        metadata = read_metadata(folder / METADATA) if has_metadata else None
        if metadata is not None:
            if metadata.error:
                verdict.bad.append(ev.BadFile(file=METADATA, reason=metadata.error))
            verdict.bad.extend(ev.BadFile(file=f, reason=r) for f, r in metadata.bad)
            verdict.notes.extend(metadata.notes)
            names = {p.name for p in images}
            for file, (row, _text) in sorted(metadata.rows.items()):
                if file not in names and not (folder / file).exists():
                    verdict.bad.append(ev.BadFile(
                        file=file, reason=f"{METADATA} row {row}: no such file in the batch"))

        # one stem, one caption file: a second image with the same stem would be ambiguous
        by_stem: dict[str, Path] = {}
        unique: list[Path] = []
        for path in images:
            if path.stem in by_stem:
                verdict.bad.append(ev.BadFile(
                    file=path.name,
                    reason=f"same stem as {by_stem[path.stem].name} (captions would be ambiguous)",
                ))
                continue
            by_stem[path.stem] = path
            unique.append(path)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="intake") as pool:
            checks = list(pool.map(lambda p: check_image(p, self.limits, tmp / p.name), unique))

        seen_sha: dict[str, str] = {}
        missing: list[Checked] = []
        for check in checks:
            if check.reason is not None:
                verdict.bad.append(ev.BadFile(file=check.name, reason=check.reason))
                continue
            assert check.sha256 is not None
            if check.sha256 in seen_sha:
                os.unlink(tmp / check.name)
                verdict.bad.append(ev.BadFile(
                    file=check.name, reason=f"duplicate of {seen_sha[check.sha256]} (same bytes)"))
                continue
            seen_sha[check.sha256] = check.name
            try:
                good = self._caption(check, folder, texts, metadata, verdict.notes)
            except UnreadableFile as exc:
                os.unlink(tmp / check.name)
                verdict.bad.append(ev.BadFile(file=check.name, reason=str(exc)))
                continue
            if good is None:
                missing.append(check)
            else:
                verdict.good.append(good)
        stems = {Path(e.name).stem for e in os.scandir(folder)
                 if not e.name.lower().endswith(".txt")}
        verdict.notes.extend(
            f"{t}: caption file without an image; ignored"
            for t in sorted(texts) if Path(t).stem not in stems
        )
        self._caption_missing(missing, tmp, verdict, metadata_error=(
            metadata.error if metadata is not None else None))
        verdict.good.sort(key=lambda g: g.check.name)
        return verdict

    def _caption(
        self, check: Checked, folder: Path, texts: set[str], metadata: Metadata | None,
        notes: list[str],
    ) -> _Good | None:
        """The image's caption from its sidecar or metadata.csv (sidecar wins), None if it has
        none; raises UnreadableFile when the caption it has is unusable."""
        max_chars = self.config.inbox.max_caption_chars
        sidecar = f"{Path(check.name).stem}.txt"
        in_metadata = metadata is not None and check.name in metadata.rows
        if sidecar in texts:
            texts.discard(sidecar)
            data = read_regular(folder / sidecar, MAX_CAPTION_FILE_BYTES)
            caption = decode_caption(data, sidecar, max_chars)
            if in_metadata:
                notes.append(f"{check.name}: caption in both {sidecar} and {METADATA}; "
                             "the sidecar wins")
            return _Good(check, caption, "sidecar")
        if metadata is not None and in_metadata:
            row, text = metadata.rows[check.name]
            caption = check_caption(text, f"in {METADATA} row {row}", max_chars)
            return _Good(check, caption, "metadata.csv")
        return None

    def _symlink(self, path: Path) -> str:
        target = os.readlink(path)
        resolved = (path.parent / target).resolve()
        if not resolved.is_relative_to(self.inbox.resolve()):
            return f"symlink leaving the inbox (-> {target}); not followed"
        return f"symlink (-> {target}); links are not followed, copy the file itself"

    def _caption_missing(
        self, missing: list[Checked], tmp: Path, verdict: _Verdict, metadata_error: str | None
    ) -> None:
        """Caption images that have none with the labeller, or mark them bad with the reason."""
        if not missing:
            return
        labelling = self.config.labelling.enabled
        captions: dict[str, str] = {}
        failure = None
        if labelling and self.labeller is not None:
            try:
                captions = self.labeller([tmp / c.name for c in missing])
            except Exception as exc:  # a broken model must not stop intake of captioned images
                log.exception("labeller failed", images=len(missing))
                failure = f"labelling failed ({type(exc).__name__}: {exc})"
        for check in missing:
            text = captions.get(check.name)
            if text is not None:
                try:
                    caption = check_caption(text, "from the labeller",
                                            self.config.inbox.max_caption_chars)
                except UnreadableFile as exc:
                    failure_reason = str(exc)
                else:
                    verdict.good.append(_Good(check, caption, "clip"))
                    verdict.generated[check.name] = caption
                    continue
            elif failure is not None:
                failure_reason = f"caption missing; {failure}"
            elif not labelling:
                stem = Path(check.name).stem
                failure_reason = (f"caption missing (no {stem}.txt and no {METADATA} row; "
                                  "labelling is off)")
                if metadata_error:
                    failure_reason = f"caption missing ({metadata_error})"
            elif self.labeller is None:
                failure_reason = "caption missing (labelling is on but no labeller is loaded)"
            else:
                failure_reason = "caption missing (the labeller gave none)"
            os.unlink(tmp / check.name)
            verdict.bad.append(ev.BadFile(file=check.name, reason=failure_reason))

    # -- decisions ---------------------------------------------------------------------------

    def _accept(self, name: str, folder: Path, tmp: Path, verdict: _Verdict) -> Outcome:
        batch_id = batch_id_of([(g.check.sha256 or "", g.caption) for g in verdict.good])
        first = self.journal.query("SELECT name FROM batches WHERE batch_id = ?", (batch_id,))
        if first:
            moved_to = self._free_name(ACCEPTED, name)
            (seq,) = self.journal.append(ev.BatchDuplicate(
                name=name, batch_id=batch_id, duplicate_of=first[0]["name"], moved_to=moved_to))
            _crash_point("journaled")
            _move(folder, self.inbox / moved_to)
            return Outcome(name, "duplicate", moved_to, batch_id, len(verdict.good),
                           tuple(verdict.bad), seq)

        files: dict[str, str] = {}
        records = []
        sidecars: dict[str, bytes] = {}
        for good in verdict.good:
            check = good.check
            sidecar = f"{Path(check.name).stem}.txt"
            sidecars[sidecar] = good.caption.encode("utf-8")
            files[f"batches/{batch_id}/{check.name}"] = check.sha256 or ""
            files[f"batches/{batch_id}/{sidecar}"] = sha256_bytes(sidecars[sidecar])
            records.append(ev.ImageRecord(
                file=check.name, sha256=check.sha256 or "", caption=good.caption,
                caption_source=good.source, width=check.width, height=check.height))
        with ThreadPoolExecutor(self.workers, thread_name_prefix="intake") as pool:
            list(pool.map(lambda item: write_synced(tmp / item[0], item[1]), sidecars.items()))
        fsync_dir(tmp)
        _crash_point("copied")
        final = self.store / batch_id
        if os.path.lexists(final):  # stored by an intake killed before its event: redo it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.store)
        _crash_point("stored")

        moved_to = self._free_name(ACCEPTED, name)
        events: list[ev.Event] = []
        if verdict.generated:
            events.append(ev.CaptionsGenerated(
                name=name,
                model=str(getattr(self.labeller, "model", self.config.labelling.model)),
                weights_sha256=str(getattr(self.labeller, "weights_sha256", "")),
                captions=dict(sorted(verdict.generated.items())),
            ))
        events.append(ev.BatchAccepted(
            name=name, batch_id=batch_id, images=tuple(records), bad=tuple(verdict.bad),
            notes=tuple(verdict.notes), moved_to=moved_to, files=files))
        try:
            seq = self.journal.append(*events)[-1]
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)  # no event: the store must not keep it
            raise
        _crash_point("journaled")
        _move(folder, self.inbox / moved_to)
        return Outcome(name, "accepted", moved_to, batch_id, len(records), tuple(verdict.bad),
                       seq)

    def _reject(
        self, name: str, folder: Path, reason: str, verdict: _Verdict, *, report: bool = True
    ) -> Outcome:
        if report:
            lines = [f"batch {name!r} rejected: {reason}", ""]
            lines += [f"{b.file}: {b.reason}" for b in verdict.bad]
            if verdict.notes:
                lines += ["", "notes:"] + [f"  {n}" for n in verdict.notes]
            atomic_write_bytes(folder / REPORT, ("\n".join(lines) + "\n").encode("utf-8"))
        moved_to = self._free_name(REJECTED, name)
        (seq,) = self.journal.append(ev.BatchRejected(
            name=name, reason=reason, bad=tuple(verdict.bad), notes=tuple(verdict.notes),
            moved_to=moved_to))
        _crash_point("journaled")
        _move(folder, self.inbox / moved_to)
        return Outcome(name, "rejected", moved_to, None, 0, tuple(verdict.bad), seq)

