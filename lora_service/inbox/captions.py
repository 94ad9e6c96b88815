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
"""

from __future__ import annotations

import csv
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

METADATA = "metadata.csv"
MAX_CAPTION_FILE_BYTES = 1 << 20
MAX_METADATA_BYTES = 64 << 20


class UnreadableFile(Exception):
    """A caption file that must not or cannot be read; the message is the journaled reason."""


def normalise(text: str) -> str:
    return " ".join(text.split())


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file, never following a symlink and never blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):
            raise UnreadableFile(f"{path.name} is a symlink (not followed)") from None
        raise UnreadableFile(f"{path.name} cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(f"{path.name} is not a regular file")
        if info.st_size > limit:
            raise UnreadableFile(f"{path.name} is larger than {limit} bytes")
        return fh.read(limit + 1)[:limit]


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


@dataclass
class Metadata:
    """What `metadata.csv` says: raw caption bytes per file name, plus its own problems."""

    rows: dict[str, tuple[int, str]] = field(default_factory=dict)  # file -> (row, text)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the whole file is unusable (then rows is empty)


def read_metadata(path: Path) -> Metadata:
    out = Metadata()
    try:
        data = read_regular(path, MAX_METADATA_BYTES)
    except UnreadableFile as exc:
        out.error = str(exc)
        return out
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        out.error = f"{METADATA} is not UTF-8 (byte {exc.start})"
        return out
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        if "file_name" not in columns or "text" not in columns:
            out.error = f"{METADATA} needs the columns file_name,text (has {','.join(columns)})"
            return out
        for number, row in enumerate(reader, start=2):
            raw = row.get("file_name") or ""
            name = member_name(raw)
            where = f"{METADATA} row {number}"
            if name is None:
                leaves = raw.strip().startswith(("/", "\\")) or ".." in raw.replace("\\", "/")
                reason = (
                    f"{where}: path leaves the batch folder"
                    if leaves
                    else f"{where}: not a file directly in the batch folder (batches are flat)"
                )
                out.bad.append((raw, reason))
                continue
            if name in out.rows:
                first = out.rows[name][0]
                out.notes.append(f"{where}: {name} already captioned in row {first}; ignored")
                continue
            out.rows[name] = (number, row.get("text") or "")
    except csv.Error as exc:
        out.rows.clear()
        out.error = f"{METADATA} is not valid CSV ({exc})"
    return out
