"""The intake flow: a complete inbox folder -> checked files -> store -> journal -> move.

Completeness. A folder is complete when it holds the `inbox.ready_marker` file, or when nothing
in it changed for `inbox.settle_seconds`. "Changed" compares a fingerprint of the folder's
entries (name, type, size, mtime, ctime) with the one seen at the previous scan; on the first
sighting (e.g. the start-up rescan) the entries' own ctimes stand in for "last seen changing".
ctime is used because a copier cannot set it: `cp -p` and `rsync -a` backdate mtime, but every
write, rename or chmod bumps ctime to the kernel's clock, so a file still being written always
looks recent. A folder with no entries at all is not a batch yet (a `mkdir` before the copy).

Nothing outside the inbox is read or written. A scan opens the inbox once, and each batch folder
once per scan with `O_DIRECTORY | O_NOFOLLOW` relative to it; every listing, stat, image,
caption and `metadata.csv` read, and the `REJECTED.txt` write, goes through that descriptor
(`dir_fd`), so a folder swapped for a symlink (`renameat2(RENAME_EXCHANGE)`) mid-scan cannot
redirect a read: it either is the symlink when opened (then it is rejected unread) or the reads
stay in the folder that was opened. `.accepted` and `.rejected` are opened the same way; if one
is a symlink or not a folder, the decision is journaled with that reason in its notes and the
batch stays where it is until the operator makes it a real folder.

Names. A folder name that is not UTF-8 or holds a backslash is journaled in an escaped form
(`shown`: `\\xNN` for bytes that are not UTF-8, `\\\\` for a backslash; two folders never share
a journal name). It is decided like any other under that name, and moved to `.accepted/` or
`.rejected/` under it (a note says so). A destination name is at most NAME_MAX bytes: a longer
one is cut and tagged with a hash of the whole (`_fitted`), so no name can make a move fail.
A file whose name is not UTF-8 is a bad file with that reason. Every name or link target
quoted in a reason or note is clipped (`clip`), and the listed bad files and notes of one event
are bounded in count and bytes (`_Verdict.journaled`), so no folder can bloat the journal.

Never a jam. Whatever a folder holds, it is decided once: a symlink (even a loop) is a bad file
judged from its text, never resolved; a folder the daemon may not read or search is rejected
unread; a report that cannot be written (read-only, full, immutable folder) is a note. A move
that fails after the decision is logged once and retried quietly at each scan.

Order of effects, chosen so that a SIGKILL anywhere leaves something the next scan finishes:
1. `BatchDetected` (once per arrival: skipped while the latest intake row of that name is a
   detection, or a decision whose move is still to be done).
2. Every file is checked; good images are written (fsynced) into `state/batches/.incoming-*`.
3. Accepted: captions are written as sidecars there, the folder is renamed to
   `state/batches/<batch_id>/` (it appears complete or not at all), then `BatchAccepted` (with
   `CaptionsGenerated` when the labeller captioned, in the same transaction), then the inbox
   folder moves to `.accepted/<name>`. Duplicate: `BatchDuplicate`, then the move. Rejected:
   our report is written into the inbox folder (`REJECTED.txt`, or `REJECTED-lora-service.txt`
   when the user has a `REJECTED.txt` of their own, which is kept), then `BatchRejected`, then
   the move to `.rejected/<name>`.
At the first scan of a process (and after a failed batch), dot-folders in `state/batches/` (a
killed intake's temp) and folders without a `BatchAccepted` (stored, then killed before the
journal) are removed: the inbox still holds their originals, so the batch is redone. A folder
still in the inbox whose latest intake row is a decision whose `moved_to` does not exist yet,
that has not changed since (ctime) and whose files still match that decision, only lacks its
move: the move is done and nothing is journaled twice. Nothing in the inbox is ever deleted.

A labeller that raises leaves the batch undecided: it is retried after `LABEL_RETRY_S`, and
only a failure at the last attempt marks the uncaptioned images bad with the reason.

`scan()` must only run in the process that holds the state lock (the daemon, or a foreground
command): it is the only writer of `state/batches/`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field, replace
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
    clip,
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
from lora_service.journal import Journal, queries
from lora_service.journal import events as ev
from lora_service.store import fsync_dir, sha256_bytes

log = structlog.get_logger(__name__)

ACCEPTED = ".accepted"
REJECTED = ".rejected"
REPORT = "REJECTED.txt"
# our report when the user's folder has a REJECTED.txt of its own: REJECTED-lora-service.txt, -2..
OWN_REPORT = "REJECTED-lora-service"
REPORT_NAME = re.compile(r"REJECTED(-lora-service(-\d+)?)?\.txt")
REPORT_MARK = b"lora-service rejected batch "  # how our report starts: recognised, replaced
BATCH_ID_HEX = 16
FINAL = ("accepted", "rejected", "duplicate")
NAME_MAX = 255  # bytes in one file name (Linux file systems)
NO_REPORT = "no report written into the folder"  # a note; the decision stands without one
# ctime (kernel clock) vs event time (our clock): tolerance for coarse timestamps
CLOCK_SLACK_S = 1.0
# a labeller that raises: the batch waits this long before each retry, then is decided
LABEL_RETRY_S = (30.0, 120.0)
LABEL_ATTEMPTS = len(LABEL_RETRY_S) + 1
# bounds on one event's payload: listed bad files and notes (the rest is counted)
MAX_BAD = 300
MAX_NOTES = 200
MAX_LISTED_BYTES = 256 << 10  # each, for bad files and notes
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK

Labeller = Callable[[list[Path]], dict[str, str]]
"""Captions for images that have none: called with the stored copies' paths, returns
{file name: caption}. Optional attributes `model` and `weights_sha256` are journaled."""


class Hooks:
    """The seam through which tests crash, slow down or watch intake: `at(point)` is called
    when the batch folder is open and nothing is read yet ("reading"), after the good images are
    in the temp folder ("copied"), after it is renamed into the store ("stored") and after the
    decision is journaled, before the move ("journaled")."""

    def at(self, point: str) -> None:
        """Nothing, in the service."""


def _is_utf8(name: str) -> bool:
    """False for a name decoded with surrogate escapes (its bytes are not UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """A file-system name as journaled and logged: itself when it is UTF-8 without a backslash;
    otherwise its bytes with `\\xNN` escapes and `\\\\` for a backslash. Injective (an escaped
    name always holds a backslash, a plain one never does), so two folders never share a
    journal name. Surrogate-escaped names cannot be stored as JSON/SQLite text."""
    if "\\" not in name and _is_utf8(name):
        return name
    return os.fsencode(name).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _fitted(name: str, n: int = 0) -> str:
    """`name`, or `name-n`, as a folder name the file system takes (at most NAME_MAX bytes): a
    longer one is cut and tagged with a hash of the whole name, so two long names stay apart."""
    whole = f"{name}-{n}" if n else name
    if len(whole.encode()) <= NAME_MAX:
        return whole
    tag = "~" + hashlib.sha256(name.encode()).hexdigest()[:12] + (f"-{n}" if n else "")
    return name.encode()[:NAME_MAX - len(tag)].decode("utf-8", "ignore") + tag


def _symlink_reason(dir_fd: int, name: str) -> str:
    """Why a symlink in a batch is bad, judged from its text alone (never resolved, so a loop or
    a dangling link costs nothing): absolute, or `..` climbing above the inbox, leaves it."""
    try:
        target = os.readlink(name, dir_fd=dir_fd)
    except OSError as exc:  # no longer a symlink since the listing
        return f"symlink that changed while read ({exc.strerror}); not followed"
    leaves, depth = target.startswith("/"), 1  # the link sits in inbox/<batch>/
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            leaves |= depth < 0
        elif part not in ("", "."):
            depth += 1
    if leaves:
        return f"symlink leaving the inbox (-> {clip(shown(target))}); not followed"
    return f"symlink (-> {clip(shown(target))}); links are not followed, copy the file itself"


@dataclass(frozen=True)
class Outcome:
    """What one scan did with one batch folder."""

    name: str  # as journaled (`shown`)
    status: Literal["accepted", "rejected", "duplicate"]
    moved_to: str  # inbox-relative, e.g. .accepted/cats-1
    batch_id: str | None = None
    images: int = 0
    bad: tuple[ev.BadFile, ...] = ()
    seq: int | None = None  # the deciding event (None: decided by an earlier run)
    finished: bool = False  # True: only the move was left from an interrupted intake
    not_moved: str | None = None  # why the folder stays in the inbox (e.g. the move failed)

    @property
    def kind(self) -> str:
        """Same as `status` (the daemon's log line reads it under this name)."""
        return self.status


def _listed(entries: list[Any], cap: int, as_json: Callable[[Any], Any]) -> list[Any]:
    """The first entries that fit in `cap` entries and MAX_LISTED_BYTES of JSON."""
    budget = MAX_LISTED_BYTES
    for n, entry in enumerate(entries[:cap]):
        budget -= len(json.dumps(as_json(entry), ensure_ascii=False).encode())
        if budget < 0:
            return entries[:n]
    return entries[:cap]


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

    def journaled(self) -> tuple[tuple[ev.BadFile, ...], tuple[str, ...]]:
        """Bad files and notes as journaled: in order, at most MAX_BAD / MAX_NOTES entries and
        MAX_LISTED_BYTES (as JSON) each, then a count of the rest. The first notes (why it was
        not moved, why there is no report) are always kept."""
        bad = _listed(self.bad, MAX_BAD, lambda b: [b.file, b.reason])
        notes = _listed(self.notes, MAX_NOTES, lambda n: n)
        if len(self.bad) > len(bad):
            bad.append(ev.BadFile(file="…", reason=f"and {len(self.bad) - len(bad):,} more bad "
                                                   "files, not listed"))
        if len(self.notes) > len(notes):
            notes.append(f"… and {len(self.notes) - len(notes):,} more notes, not listed")
        return tuple(bad), tuple(notes)


@dataclass(frozen=True)
class _Sighting:
    fingerprint: tuple[Any, ...]
    since: float  # when that fingerprint was first seen (or its newest ctime, at first sight)


class _LabellingFailed(Exception):
    """The labeller raised before its last attempt: the batch stays undecided."""


def batch_id_of(pairs: list[tuple[str, str]]) -> str:
    """Content address of a batch: sha256 over the sorted (image sha256, caption) pairs."""
    blob = json.dumps(sorted(pairs), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:BATCH_ID_HEX]


def _sha256_at(dir_fd: int, name: str) -> str | None:
    """sha256 of a regular file in a folder (never through a symlink), None if not one."""
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _is_own_report(dir_fd: int, name: str) -> bool:
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as fh:
        return stat.S_ISREG(os.fstat(fd).st_mode) and fh.read(len(REPORT_MARK)) == REPORT_MARK


def _report_name(dir_fd: int) -> str:
    """Where our report goes: REJECTED.txt unless that is the user's own file (kept). Raises
    OSError when it cannot tell or no name is free."""
    names = [REPORT, f"{OWN_REPORT}.txt", *(f"{OWN_REPORT}-{n}.txt" for n in range(2, 1000))]
    for name in names:
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return name
        if _is_own_report(dir_fd, name):
            return name
    raise FileExistsError(errno.EEXIST, "no free name for the report")


def _write_at(dir_fd: int, name: str, data: bytes) -> None:
    """Atomically (re)place `name` in a folder, never through a symlink."""
    tmp = f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


class Intake:
    """Turns complete inbox folders into journaled batches. One instance per daemon process."""

    def __init__(
        self,
        journal: Journal,
        config: Config,
        *,
        labeller: Labeller | None = None,
        workers: int | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self.journal = journal
        self.config = config
        self.labeller = labeller
        self.hooks = hooks or Hooks()
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
        self._label_failures: dict[str, tuple[int, float]] = {}  # name -> (failures, retry at)
        self._blocked: set[str] = set()  # names whose move waits for a real .accepted/.rejected
        self._lock = threading.Lock()
        self._store_checked = False  # leftovers of a killed run are cleaned at the first scan
        self._inbox_fd = -1  # the inbox, opened for the length of one scan

    # -- scanning ----------------------------------------------------------------------------

    def scan(self, now: float | None = None) -> list[Outcome]:
        """Look at every batch folder once; process the complete ones; return what happened.

        Safe to call as often as the watcher fires: incomplete folders cost a few stat calls.
        A batch that fails with an unexpected error (e.g. disk full) is logged and retried on
        the next scan; nothing about it is journaled as decided.
        """
        with self._lock:
            self.inbox.mkdir(parents=True, exist_ok=True)
            self._inbox_fd = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY)
            try:
                return self._scan(time.time() if now is None else now)
            finally:
                os.close(self._inbox_fd)
                self._inbox_fd = -1

    def _scan(self, now: float) -> list[Outcome]:
        if not self._store_checked:
            self._clean_store()
            self._store_checked = True
        outcomes: list[Outcome] = []
        present: set[str] = set()
        for entry in sorted(os.scandir(self._inbox_fd), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if not (entry.is_symlink() or entry.is_dir(follow_symlinks=False)):
                continue  # a loose file in the inbox root is not a batch
            present.add(entry.name)
            key = shown(entry.name)
            try:
                outcome = self._visit(entry.name, key, now)
            except _LabellingFailed as exc:
                failures = self._label_failures.get(key, (0, 0.0))[0] + 1
                wait = LABEL_RETRY_S[failures - 1]
                self._label_failures[key] = (failures, now + wait)
                log.warning("labelling failed; the batch stays undecided and is retried",
                            batch=key, attempt=failures, attempts=LABEL_ATTEMPTS,
                            retry_in_s=wait, error=str(exc))
                continue
            except Exception:
                log.exception("intake failed; retried on the next scan", batch=key)
                self._seen.pop(entry.name, None)
                self._store_checked = False
                continue
            if outcome is not None:
                self._label_failures.pop(key, None)
                outcomes.append(outcome)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        keys = {shown(name) for name in present}
        for gone_key in set(self._label_failures) - keys:
            del self._label_failures[gone_key]
        self._blocked &= keys
        return outcomes

    def _fingerprint(self, fd: int) -> tuple[tuple[Any, ...], float]:
        """(entries' identity, newest change time) of a folder's direct entries."""
        entries = []
        newest = 0.0
        for entry in os.scandir(fd):
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError as exc:  # gone since the listing (a copier's temp file): a change
                entries.append((entry.name, exc.errno))
                continue
            entries.append(
                (entry.name, stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns,
                 info.st_ctime_ns)
            )
            newest = max(newest, info.st_mtime, info.st_ctime)
        return tuple(sorted(entries)), newest

    def _complete(self, name: str, fd: int | str, now: float) -> bool | None:
        """True when complete, False while settling, None when it is not a batch yet (empty)."""
        if isinstance(fd, str):
            return True  # rejected unread, as it is
        fingerprint, newest = self._fingerprint(fd)
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

    def _open_batch(self, name: str) -> int | str | None:
        """The batch folder opened once, never through a symlink: its fd; or why it is rejected
        unread (a symlink, a folder the daemon may not read or search); None when it is gone
        or no longer a folder (not a batch now)."""
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=self._inbox_fd)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                return f"the batch folder cannot be read ({exc.strerror}); not read"
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            try:
                info = os.stat(name, dir_fd=self._inbox_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            return "the batch folder is a symlink (not followed)" if stat.S_ISLNK(
                info.st_mode) else None
        if not os.access(".", os.R_OK | os.X_OK, dir_fd=fd, effective_ids=True):
            os.close(fd)
            return "the batch folder cannot be searched (no x permission for us); not read"
        return fd

    def _visit(self, name: str, key: str, now: float) -> Outcome | None:
        failed = self._label_failures.get(key)
        if failed is not None and now < failed[1]:
            return None  # the labeller failed: wait before trying again
        last = queries.last_intake(self.journal, key)
        pending = None
        if last is not None and last.outcome in FINAL:
            try:
                done = self._exists(last.moved_to)
            except OSError as exc:  # cannot tell: the move below says why, if it fails; but a
                done = exc.errno == errno.ENAMETOOLONG  # name no move can take: decided anew
            pending = None if done else last
        new_arrival = pending is None and (last is None or last.outcome in FINAL)
        fd = self._open_batch(name)
        if fd is None:
            return None
        try:
            complete = self._complete(name, fd, now)
            if complete is None:
                return None
            if new_arrival:
                self.journal.append(ev.BatchDetected(name=key))
            if not complete:
                return None
            self._seen.pop(name, None)
            if pending is not None:
                moved_to = pending.moved_to
                problem = self._kind_problem(moved_to.partition("/")[0])
                if problem is None and self._only_move_missing(pending, name, fd):
                    problem = self._move(name, moved_to)
                    if problem is None:
                        log.info("finished an interrupted move", batch=key, moved_to=moved_to)
                        bad = tuple(ev.BadFile(**b) for b in pending.bad)
                        return Outcome(key, pending.outcome, moved_to, pending.batch_id,
                                       bad=bad, finished=True)
                if problem is not None:  # decided; the move waits (e.g. for a real folder)
                    self._stays(key, problem)
                    return None
                self.journal.append(ev.BatchDetected(name=key))
            return self._process(name, key, fd)
        finally:
            if isinstance(fd, int):
                os.close(fd)

    # -- the inbox's own folders -------------------------------------------------------------

    def _kind_problem(self, kind: str) -> str | None:
        """Why `.accepted` / `.rejected` cannot receive a batch (a symlink, not a folder)."""
        try:
            info = os.stat(kind, dir_fd=self._inbox_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode):
            return f"inbox/{kind} is a symlink (never followed); make it a real folder"
        if not stat.S_ISDIR(info.st_mode):
            return f"inbox/{kind} is not a folder; make it one"
        return None

    def _exists(self, moved_to: str) -> bool:
        """Does `kind/name` exist in the inbox, looked up without following any symlink?
        Raises OSError when it cannot tell."""
        kind, _, target = moved_to.partition("/")
        try:
            kind_fd = os.open(kind, DIR_FLAGS, dir_fd=self._inbox_fd)
        except FileNotFoundError:
            return False
        try:
            os.stat(target, dir_fd=kind_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        finally:
            os.close(kind_fd)
        return True

    def _move(self, name: str, moved_to: str) -> str | None:
        """Rename the batch into `.accepted/` or `.rejected/`, a real folder opened without
        following a symlink; why not, when that fails (the folder stays; retried each scan)."""
        kind, _, target = moved_to.partition("/")
        try:
            with suppress(FileExistsError):
                os.mkdir(kind, dir_fd=self._inbox_fd)
            kind_fd = os.open(kind, DIR_FLAGS, dir_fd=self._inbox_fd)
        except OSError as exc:
            return f"inbox/{kind} cannot be opened ({exc.strerror})"
        try:
            os.rename(name, target, src_dir_fd=self._inbox_fd, dst_dir_fd=kind_fd)
        except OSError as exc:
            return f"the move to inbox/{moved_to} failed ({exc.strerror})"
        else:
            os.fsync(kind_fd)
        finally:
            os.close(kind_fd)
        os.fsync(self._inbox_fd)
        return None

    def _move_out(self, name: str, outcome: Outcome) -> Outcome:
        """The move after a decision, unless the destination was already known to be unusable;
        the outcome says why the folder stays in the inbox."""
        problem = outcome.not_moved or self._move(name, outcome.moved_to)
        if problem is None:
            return outcome
        self._stays(outcome.name, problem)
        return replace(outcome, not_moved=problem)

    def _stays(self, key: str, problem: str) -> None:
        """Log, once per folder, why a decided batch stays in the inbox."""
        if key not in self._blocked:
            log.error("batch not moved", batch=key, why=problem)
            self._blocked.add(key)

    def _destination(self, kind: str, key: str, verdict: _Verdict) -> tuple[str, str | None]:
        """Where a decided folder goes: `kind/<key>`, or `-1`, `-2`, ... (never over an entry,
        never over NAME_MAX bytes); and why it cannot go there now, also noted in the verdict."""
        problem, n = self._kind_problem(kind), 0
        moved_to = f"{kind}/{_fitted(key)}"
        while problem is None:
            moved_to = f"{kind}/{_fitted(key, n)}"
            try:
                if not self._exists(moved_to):
                    break
            except OSError as exc:
                problem = f"inbox/{moved_to} cannot be looked up ({exc.strerror})"
            n += 1
        if problem is not None:
            verdict.notes.insert(0, f"not moved: {problem}; the folder stays in the inbox "
                                    "until then")
        elif not moved_to.partition("/")[2].startswith(key):
            verdict.notes.append(f"the name is longer than {NAME_MAX} bytes: moved as "
                                 f"{clip(moved_to)}")
        return moved_to, problem

    # -- recovery ----------------------------------------------------------------------------

    def _clean_store(self) -> None:
        """Remove what a killed intake left in the store: temp folders and unjournaled batches."""
        if not self.store.is_dir():
            return
        known = set(queries.batch_rows(self.journal))
        for entry in os.scandir(self.store):
            if entry.name.startswith(".") or entry.name not in known:
                log.warning("removing what an interrupted intake left", path=entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)

    def _only_move_missing(self, row: queries.IntakeDecision, name: str,
                           fd: int | str) -> bool:
        """Is this the folder a journaled decision was about (so only its move is missing)?

        Not if it changed after the decision: a rename (a user moving `.rejected/x` back into
        the inbox after fixing it) or a new entry bumps the folder's ctime past the event's
        time. Then the content must still match: the decided images, or our report (unless
        the decision says none could be written).
        """
        decided = datetime.fromisoformat(row.ts).timestamp()
        info = (os.fstat(fd) if isinstance(fd, int)
                else os.stat(name, dir_fd=self._inbox_fd, follow_symlinks=False))
        if info.st_ctime > decided + CLOCK_SLACK_S:
            return False
        if row.outcome == "rejected":
            if isinstance(fd, str) or any(n.startswith(NO_REPORT) for n in row.notes):
                return True  # rejected unread, or without a report
            reports = [e.name for e in os.scandir(fd) if REPORT_NAME.fullmatch(e.name)]
            return any(_is_own_report(fd, name) for name in reports)
        if isinstance(fd, str):
            return False
        wanted = queries.batch_image_shas(self.journal, row.batch_id)
        have = {
            _sha256_at(fd, entry.name)
            for entry in os.scandir(fd)
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".")
        }
        return bool(wanted) and wanted <= have

    # -- processing --------------------------------------------------------------------------

    def _process(self, name: str, key: str, fd: int | str) -> Outcome:
        if isinstance(fd, str):
            return self._reject(name, key, None, fd, _Verdict())
        self.hooks.at("reading")
        self.store.mkdir(parents=True, exist_ok=True)
        tmp = self.store / f".incoming-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            failures = self._label_failures.get(key, (0, 0.0))[0]
            verdict = self._check(fd, tmp, labelling_attempt=failures + 1)
            if key != name:
                verdict.notes.insert(0, f"the folder's name is not UTF-8 or holds a backslash: "
                                        f"journaled and moved as {clip(key)}")
            minimum = self.config.inbox.min_images
            if not verdict.good:
                reason = f"no usable image ({len(verdict.bad)} bad files)"
                return self._reject(name, key, fd, reason, verdict)
            if len(verdict.good) < minimum:
                reason = (f"{len(verdict.good)} usable images, fewer than "
                          f"inbox.min_images = {minimum}")
                return self._reject(name, key, fd, reason, verdict)
            return self._accept(name, key, tmp, verdict)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check(self, fd: int, tmp: Path, labelling_attempt: int) -> _Verdict:
        """Check every entry of the open batch folder `fd`; good images are copied into `tmp`.
        A `REJECTED*.txt` is skipped only when it is our report; otherwise it is a caption file
        like any other (the sidecar of `REJECTED.png`)."""
        cfg = self.config.inbox
        verdict = _Verdict()
        entries = sorted(os.scandir(fd), key=lambda e: e.name)
        images: list[str] = []
        texts: dict[str, list[str]] = {}  # stem -> caption files with that stem (any .txt case)
        has_metadata = False
        for entry in entries:
            name, suffix = entry.name, Path(entry.name).suffix.lower()
            if name == cfg.ready_marker or (
                    REPORT_NAME.fullmatch(name) and _is_own_report(fd, name)):
                continue
            if name.startswith("."):
                verdict.notes.append(f"{clip(shown(name))}: hidden file ignored")
            elif not _is_utf8(name):
                verdict.bad.append(ev.BadFile(file=clip(shown(name)), reason=(
                    "file name is not UTF-8 (shown with \\x escapes); rename it")))
            elif name == METADATA:
                has_metadata = True
            elif suffix == ".txt":
                texts.setdefault(Path(name).stem, []).append(name)  # read with its image
            elif entry.is_symlink():
                verdict.bad.append(ev.BadFile(file=name, reason=_symlink_reason(fd, name)))
            elif entry.is_dir(follow_symlinks=False):
                verdict.bad.append(ev.BadFile(
                    file=name, reason="a sub-folder (batches are flat; not read)"))
            elif suffix.lstrip(".") in cfg.allowed_extensions:
                images.append(name)
            else:
                allowed = ", ".join(cfg.allowed_extensions)
                verdict.bad.append(ev.BadFile(
                    file=name, reason=f"extension {suffix or '(none)'} not allowed "
                                      f"(allowed: {allowed})"))

        metadata = None
        if has_metadata:
            metadata = read_metadata(METADATA, {e.name for e in entries}, dir_fd=fd)
            if metadata.error:
                verdict.bad.append(ev.BadFile(file=METADATA, reason=metadata.error))
            verdict.bad.extend(ev.BadFile(file=f, reason=r) for f, r in metadata.bad)
            verdict.notes.extend(metadata.notes)

        # one stem, one caption file: a second image with the same stem would be ambiguous
        by_stem: dict[str, str] = {}
        unique: list[str] = []
        for image in images:
            stem = Path(image).stem
            if stem in by_stem:
                verdict.bad.append(ev.BadFile(
                    file=image,
                    reason=f"same stem as {by_stem[stem]} (captions would be ambiguous)",
                ))
                continue
            by_stem[stem] = image
            unique.append(image)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="intake") as pool:
            checks = list(pool.map(
                lambda n: check_image(n, self.limits, tmp / n, dir_fd=fd), unique))

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
                good = self._caption(check, fd, texts, metadata, verdict.notes)
            except UnreadableFile as exc:
                os.unlink(tmp / check.name)
                verdict.bad.append(ev.BadFile(file=check.name, reason=str(exc)))
                continue
            if good is None:
                missing.append(check)
            else:
                verdict.good.append(good)
        stems = {Path(e.name).stem: e.name for e in entries
                 if Path(e.name).suffix.lower() != ".txt"}
        folded = {stem.lower(): entry for stem, entry in stems.items()}
        for stem, names in sorted(texts.items()):
            if stem in stems:
                continue  # the sidecar of an entry that is bad for its own reason
            near = folded.get(stem.lower())
            verdict.notes.extend(
                f"{text}: caption file without an image; ignored" if near is None else
                f"{text}: caption file without an image ({near} differs in case; a caption's "
                "name must match its image's exactly); ignored"
                for text in names)
        self._caption_missing(missing, tmp, verdict, labelling_attempt, metadata_error=(
            metadata.error if metadata is not None else None))
        verdict.good.sort(key=lambda g: g.check.name)
        return verdict

    def _caption(
        self, check: Checked, fd: int, texts: dict[str, list[str]], metadata: Metadata | None,
        notes: list[str],
    ) -> _Good | None:
        """The image's caption from its sidecar or metadata.csv (sidecar wins), None if it has
        none; raises UnreadableFile when the caption it has is unusable.

        The sidecar is `<image stem>.txt` as kohya reads it (the stem matched exactly); the
        `.txt` may be in any case (`A.TXT` for `A.PNG`, as written on Windows). With several,
        `.txt` itself wins, else the first by name; the others are noted, not used."""
        max_chars = self.config.inbox.max_caption_chars
        stem = Path(check.name).stem
        found = texts.pop(stem, [])
        in_metadata = metadata is not None and check.name in metadata.rows
        if found:
            sidecar = f"{stem}.txt" if f"{stem}.txt" in found else found[0]
            notes.extend(f"{other}: not used; {check.name}'s caption is {sidecar}"
                         for other in found if other != sidecar)
            data = read_regular(sidecar, MAX_CAPTION_FILE_BYTES, dir_fd=fd)
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

    def _caption_missing(
        self, missing: list[Checked], tmp: Path, verdict: _Verdict, attempt: int,
        metadata_error: str | None,
    ) -> None:
        """Caption images that have none with the labeller, or mark them bad with the reason.
        A labeller that raises leaves the batch undecided (`_LabellingFailed`) until its last
        attempt: a model that failed once (out of memory, a killed child) is not a verdict."""
        if not missing:
            return
        labelling = self.config.labelling.enabled
        captions: dict[str, str] = {}
        failure = None
        if labelling and self.labeller is not None:
            try:
                captions = self.labeller([tmp / c.name for c in missing])
            except Exception as exc:  # a broken model must not stop intake of captioned images
                if attempt < LABEL_ATTEMPTS:
                    raise _LabellingFailed(f"{type(exc).__name__}: {exc}") from exc
                log.exception("labeller failed; its last attempt", images=len(missing))
                failure = (f"labelling failed {attempt} times ({type(exc).__name__}: {exc})")
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

    def _accept(self, name: str, key: str, tmp: Path, verdict: _Verdict) -> Outcome:
        batch_id = batch_id_of([(g.check.sha256 or "", g.caption) for g in verdict.good])
        first = queries.batch(self.journal, batch_id)
        moved_to, problem = self._destination(ACCEPTED, key, verdict)
        bad, notes = verdict.journaled()
        if first:
            (seq,) = self.journal.append(ev.BatchDuplicate(
                name=key, batch_id=batch_id, duplicate_of=first.name, moved_to=moved_to))
            self.hooks.at("journaled")
            return self._move_out(name, Outcome(key, "duplicate", moved_to, batch_id,
                                                len(verdict.good), bad, seq, not_moved=problem))

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
        self.hooks.at("copied")
        final = self.store / batch_id
        if os.path.lexists(final):  # stored by an intake killed before its event: redo it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.store)
        self.hooks.at("stored")

        events: list[ev.Event] = []
        if verdict.generated:
            events.append(ev.CaptionsGenerated(
                name=key,
                model=str(getattr(self.labeller, "model", self.config.labelling.model)),
                weights_sha256=str(getattr(self.labeller, "weights_sha256", "")),
                captions=dict(sorted(verdict.generated.items())),
            ))
        events.append(ev.BatchAccepted(
            name=key, batch_id=batch_id, images=tuple(records), bad=bad, notes=notes,
            moved_to=moved_to, files=files))
        try:
            seq = self.journal.append(*events)[-1]
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)  # no event: the store must not keep it
            raise
        self.hooks.at("journaled")
        return self._move_out(name, Outcome(key, "accepted", moved_to, batch_id, len(records),
                                            bad, seq, not_moved=problem))

    def _reject(
        self, name: str, key: str, fd: int | None, reason: str, verdict: _Verdict
    ) -> Outcome:
        """Journal the rejection; our report goes into the folder (none when it was not read).
        A report that cannot be written (read-only, full or immutable folder) is a note, not a
        failure: the batch must be decided once either way."""
        moved_to, problem = self._destination(REJECTED, key, verdict)
        if fd is not None:
            try:
                report = _report_name(fd)
                notes = verdict.notes + ([f"{REPORT} is the user's own and is kept; the report "
                                          f"is {report}"] if report != REPORT else [])
                lines = [f"{REPORT_MARK.decode()}{clip(key)!r}: {reason}", ""]
                lines += [f"{b.file}: {b.reason}" for b in verdict.bad]
                if notes:
                    lines += ["", "notes:"] + [f"  {n}" for n in notes]
                _write_at(fd, report, ("\n".join(lines) + "\n").encode("utf-8"))
                verdict.notes = notes
            except OSError as exc:
                verdict.notes.insert(0, f"{NO_REPORT} ({exc.strerror})")
        bad, notes = verdict.journaled()
        (seq,) = self.journal.append(ev.BatchRejected(
            name=key, reason=reason, bad=bad, notes=notes, moved_to=moved_to))
        self.hooks.at("journaled")
        return self._move_out(name, Outcome(key, "rejected", moved_to, None, 0, bad, seq,
                                            not_moved=problem))
