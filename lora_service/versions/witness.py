"""Witnesses: published files that remember the journal position they were published at.

A hash chain proves its events unchanged only relative to its own last hash: whoever can write
the journal can rewrite or cut off its tail and recompute every later hash, and `verify` alone
still passes. So every version's files carry the position (`seq`, `hash`) of the last event
before the version was decided (read before its files are written; its own `VersionCreated`
cannot be in them, since that event records their sha256):

- the kohya file and the peft `adapter_model.safetensors` (and `text_encoder/`'s): safetensors
  metadata `lora_service_version`, `lora_service_journal_seq`, `lora_service_journal_hash`;
- `card.json`: `version`, `journal_seq`, `journal_hash`.

Deployed and exported files are byte copies, so they are witnesses too. `verify --witness`
checks, per file: the journal still has that hash at that seq (the chain up to there is
unchanged), the version is still journaled, and the file's sha256 is one its `VersionCreated`
recorded (so a cut-off or rewritten `VersionCreated` of the newest version is caught too).
No torch: the safetensors header is plain JSON after an 8-byte length.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lora_service.errors import UsageError
from lora_service.journal import Journal, queries
from lora_service.store import CHUNK

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAX_CARD = MAX_HEADER  # a card lists every image of its version; a bound, not a format limit
MAX_SEQ_DIGITS = 19  # 2**63 - 1, the largest seq SQLite holds
SEQS = range(2**63)
DIGEST = re.compile(r"[0-9a-f]{64}")
VERSION = re.compile(r"[A-Za-z0-9._-]{1,64}")  # `v0001`; never text that could steer a terminal
CARD = "card.json"
NOT_OURS = "not a lora-service version file: kohya or peft .safetensors, or card.json"


class NotAWitness(Exception):
    """Why a file carries no usable witness: one line, named after the file by the caller."""


@dataclass(frozen=True)
class Witness:
    path: Path
    version: str
    seq: int
    hash: str
    # of the bytes the witness was read from (same descriptor): `check` never reopens the path
    sha256: str = field(compare=False)


def metadata(version: str, seq: int, digest: str) -> dict[str, str]:
    """The safetensors metadata keys that make a file a witness."""
    return {
        "lora_service_version": version,
        "lora_service_journal_seq": str(seq),
        "lora_service_journal_hash": digest,
    }


def _open_regular(path: Path) -> BinaryIO:
    """`path` open for reading, refused unless a regular file. O_NONBLOCK makes opening a FIFO
    (or a device) return at once instead of waiting for a writer; fstat on that descriptor then
    decides, so a swap after the check changes nothing. Symlinks are followed: the user named
    the path or its folder, and what it leads to is checked the same way."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAWitness("not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _safetensors_fields(fh: BinaryIO) -> tuple[object, object, object]:
    head = fh.read(8)
    size = int.from_bytes(head, "little")
    if len(head) < 8 or not 0 < size <= MAX_HEADER:
        raise NotAWitness(NOT_OURS)
    text = fh.read(size)
    if len(text) < size:
        raise NotAWitness("its safetensors header is cut short")
    header = json.loads(text)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    return (meta.get("lora_service_version"), meta.get("lora_service_journal_seq"),
            meta.get("lora_service_journal_hash"))


def _card_fields(fh: BinaryIO) -> tuple[object, object, object]:
    text = fh.read(MAX_CARD + 1)
    if len(text) > MAX_CARD:
        raise NotAWitness(f"larger than {MAX_CARD} bytes")
    card = json.loads(text)
    if not isinstance(card, dict):
        raise NotAWitness(NOT_OURS)
    return card.get("version"), card.get("journal_seq"), card.get("journal_hash")


def _seq(value: object) -> int:
    """The seq a witness records: an int (card.json) or its ASCII digits (safetensors metadata,
    where every value is a string). `isdigit` alone takes "²" and other digits `int` refuses."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and (
        len(value) <= MAX_SEQ_DIGITS
    ):
        value = int(value)
    if type(value) is not int or value not in SEQS:
        raise NotAWitness(f"its journal seq is not a number from 0 to {SEQS.stop - 1}")
    return value


def load(path: Path) -> Witness:
    """The witness `path` carries, and the sha256 of the bytes it was read from; NotAWitness
    says why there is none. Never raises anything else for what a file holds, and never blocks
    on one that is not a regular file."""
    try:
        with _open_regular(path) as fh:
            fields = _card_fields(fh) if path.name == CARD else _safetensors_fields(fh)
            version, seq, digest = fields
            if version is None or seq is None or digest is None:
                raise NotAWitness(NOT_OURS)
            if not (isinstance(version, str) and VERSION.fullmatch(version)):
                raise NotAWitness("its version is not a lora-service version name")
            if not (isinstance(digest, str) and DIGEST.fullmatch(digest)):
                raise NotAWitness("its journal hash is not 64 hex digits")
            seq = _seq(seq)
            fh.seek(0)
            sha = hashlib.sha256()
            while chunk := fh.read(CHUNK):
                sha.update(chunk)
    except OSError as exc:
        raise NotAWitness(f"cannot be read ({exc.strerror or exc})") from None
    except ValueError:  # not JSON, not UTF-8, an integer past Python's digit limit
        raise NotAWitness("its JSON cannot be parsed") from None
    except RecursionError:
        raise NotAWitness("its JSON is nested deeper than the parser goes") from None
    return Witness(path, version, seq, digest, sha.hexdigest())


def read(path: Path) -> Witness | None:
    """The witness `path` carries, or None (not ours, or unreadable as a witness)."""
    try:
        return load(path)
    except NotAWitness:
        return None


def find(paths: tuple[Path, ...]) -> list[Witness]:
    """The witnesses among `paths`: a file must be one (UsageError otherwise); a folder is
    searched for `*.safetensors` and `card.json`, skipping files that carry none."""
    found: list[Witness] = []
    for path in paths:
        if not path.is_dir():
            try:
                found.append(load(path))
            except NotAWitness as exc:
                raise UsageError(f"{path}: carries no journal witness ({exc})") from None
            continue
        for folder, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                if name == CARD or name.endswith(".safetensors"):
                    witness = read(Path(folder) / name)
                    found += [witness] if witness else []
    if not found:
        listed = ", ".join(str(p) for p in paths)
        raise UsageError(f"--witness {listed}: no witness found (no lora-service .safetensors "
                         "or card.json)")
    return found


def check(journal: Journal, witness: Witness) -> list[str]:
    """What the journal no longer holds of what `witness` saw (empty when it all holds)."""
    name, seq = witness.path, witness.seq
    problems = []
    digest = journal.hash_at(seq)
    if digest is None:
        problems.append(
            f"{name}: witnessed seq {seq}, but the journal ends at seq {journal.last_seq()} "
            "(events were cut off)"
        )
    elif digest != witness.hash:
        problems.append(
            f"{name}: seq {seq} has hash {digest[:16]}… in the journal, the witness recorded "
            f"{witness.hash[:16]}… (events up to seq {seq} were rewritten)"
        )
    row = queries.version(journal, witness.version)
    if row is None:
        problems.append(f"{name}: {witness.version} is not in the journal (its VersionCreated "
                        "was cut off or rewritten)")
        return problems
    recorded = set(json.loads(row["files"] or "{}").values())
    if witness.sha256 not in recorded:
        problems.append(f"{name}: its sha256 is none of the files {witness.version}'s "
                        "VersionCreated recorded (the file or that event changed)")
    return problems
