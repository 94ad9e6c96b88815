"""Captions of a batch: `<stem>.txt` sidecars (kohya) and `metadata.csv` (HF imagefolder).

Rules, each for a reason:
- A caption file is read like an image: `O_NOFOLLOW | O_NONBLOCK` and only if it is a regular
  file, so a sidecar that is a symlink to `/etc/passwd` can never leak into a caption, and a FIFO
  never blocks the intake.
- Captions are UTF-8 (a BOM is tolerated); anything else is refused, not guessed.
- Normalised: surrounding whitespace stripped and inner runs of whitespace collapsed to one
  space, so `"a  cat\\n"` and `"a cat"` give the same batch_id.
- A `metadata.csv` row names a file directly in the batch folder; `../../x.png`, an absolute
  path or a sub-folder path is a bad row with its own reason (batches are flat).
- A caption in both places: the sidecar wins (it sits next to the image and is the more specific
  statement) and the batch's notes say so.
- Files are opened relative to the batch folder's descriptor (`dir_fd`), so a folder swapped for
  a symlink mid-intake cannot redirect a read.
- `metadata.csv` is bounded: only rows naming an entry of the batch are kept (at most one per
  entry), and each kind of bad row is listed `MAX_LISTED` times, then counted, so a 300k-row
  file costs one pass and a few lines in the journal, not one event line per row.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path

METADATA = "metadata.csv"
MAX_CAPTION_FILE_BYTES = 1 << 20
MAX_METADATA_BYTES = 64 << 20
MAX_LISTED = 20  # bad metadata.csv rows listed one by one per kind; the rest are counted
MAX_SHOWN_CHARS = 200  # a name (file_name, link target, escaped name) as quoted in a reason


class UnreadableFile(Exception):
    """A caption file that must not or cannot be read; the message is the journaled reason."""


def normalise(text: str) -> str:
    return " ".join(text.split())


def read_regular(path: str | Path, limit: int, *, dir_fd: int | None = None) -> bytes:
    """The bytes of a regular file (relative to `dir_fd` when given), never following a symlink
    and never blocking on a FIFO."""
    name = os.path.basename(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableFile(f"{name} is a symlink (not followed)") from None
        raise UnreadableFile(f"{name} cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(f"{name} is not a regular file")
        if info.st_size > limit:
            raise UnreadableFile(f"{name} is larger than {limit} bytes")
        return fh.read(min(info.st_size, limit) + 1)[:limit]  # not a limit-sized buffer


def decode_caption(data: bytes, what: str, max_chars: int) -> str:
    """Decode and normalise one caption; raise UnreadableFile with the reason when unusable."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"caption {what} is not UTF-8 (byte {exc.start})") from None
    return check_caption(text, what, max_chars)


def check_caption(text: str, what: str, max_chars: int) -> str:
    """Normalise one caption; raise UnreadableFile when it is empty or too long."""
    caption = normalise(text)
    if not caption:
        raise UnreadableFile(f"caption {what} is empty")
    if len(caption) > max_chars:
        raise UnreadableFile(
            f"caption {what} is {len(caption)} characters, longer than "
            f"inbox.max_caption_chars = {max_chars}"
        )
    return caption


def member_name(value: str) -> str | None:
    """`value` as a plain file name directly in the batch folder, or None if it is anything else."""
    value = value.strip().replace("\\", "/")
    while value.startswith("./"):
        value = value[2:]
    if not value or value in (".", "..") or "/" in value or "\x00" in value:
        return None
    return value


def clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """`text` cut to `limit` characters with an ellipsis: a name quoted in a reason or note
    must not make the journal event (or the report) grow with it."""
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass
class Metadata:
    """What `metadata.csv` says about the batch's entries, plus its own problems."""

    rows: dict[str, tuple[int, str]] = field(default_factory=dict)  # file -> (row, text)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the whole file is unusable (then rows is empty)


def read_metadata(path: str | Path, present: Set[str], *, dir_fd: int | None = None) -> Metadata:
    """Read `metadata.csv`, keeping only rows that name an entry in `present` (the batch)."""
    out = Metadata()
    try:
        data = read_regular(path, MAX_METADATA_BYTES, dir_fd=dir_fd)
    except UnreadableFile as exc:
        out.error = str(exc)
        return out
    try:
        data.decode("utf-8-sig")  # checked whole for the byte offset; parsed as a stream
    except UnicodeDecodeError as exc:
        out.error = f"{METADATA} is not UTF-8 (byte {exc.start})"
        return out
    counts = {"missing": 0, "path": 0, "repeat": 0}

    def listed(kind: str) -> bool:
        counts[kind] += 1
        return counts[kind] <= MAX_LISTED

    try:
        reader = csv.DictReader(io.TextIOWrapper(io.BytesIO(data), "utf-8-sig", newline=""))
        columns = reader.fieldnames or []
        if "file_name" not in columns or "text" not in columns:
            shown = clip(",".join(columns))
            out.error = f"{METADATA} needs the columns file_name,text (has {shown})"
            return out
        for number, row in enumerate(reader, start=2):
            raw = row.get("file_name") or ""
            name = member_name(raw)
            where = f"{METADATA} row {number}"
            if name is None:
                if listed("path"):
                    leaves = raw.strip().startswith(("/", "\\")) or ".." in raw.replace("\\", "/")
                    reason = (
                        f"{where}: path leaves the batch folder"
                        if leaves
                        else f"{where}: not a file directly in the batch folder (batches are flat)"
                    )
                    out.bad.append((clip(raw), reason))
            elif name not in present:
                if listed("missing"):
                    out.bad.append((clip(name), f"{where}: no such file in the batch"))
            elif name in out.rows:
                if listed("repeat"):
                    first = out.rows[name][0]
                    out.notes.append(f"{where}: {name} already captioned in row {first}; ignored")
            else:
                out.rows[name] = (number, row.get("text") or "")
    except csv.Error as exc:
        out.rows.clear()
        out.error = f"{METADATA} is not valid CSV ({clip(str(exc))})"
        return out
    more = {kind: n - MAX_LISTED for kind, n in counts.items() if n > MAX_LISTED}
    if "path" in more:
        out.bad.append((METADATA, f"… and {more['path']:,} more rows whose file_name is not a "
                                  "file directly in the batch folder"))
    if "missing" in more:
        out.bad.append((METADATA, f"… and {more['missing']:,} more rows naming files not in "
                                  "the batch"))
    if "repeat" in more:
        out.notes.append(f"{METADATA}: … and {more['repeat']:,} more rows naming a file already "
                         "captioned; ignored")
    return out
