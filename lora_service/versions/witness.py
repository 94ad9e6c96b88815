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

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lora_service.errors import UsageError
from lora_service.journal import Journal, queries
from lora_service.store import sha256_file

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
CARD = "card.json"


@dataclass(frozen=True)
class Witness:
    path: Path
    version: str
    seq: int
    hash: str


def metadata(version: str, seq: int, digest: str) -> dict[str, str]:
    """The safetensors metadata keys that make a file a witness."""
    return {
        "lora_service_version": version,
        "lora_service_journal_seq": str(seq),
        "lora_service_journal_hash": digest,
    }


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size <= MAX_HEADER:
            return None
        header = json.loads(fh.read(size))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def read(path: Path) -> Witness | None:
    """The witness `path` carries, or None (not ours, or unreadable as a witness)."""
    try:
        if path.name == CARD:
            card = json.loads(path.read_bytes())
            fields = (card.get("version"), card.get("journal_seq"), card.get("journal_hash"))
        else:
            meta = _safetensors_metadata(path) or {}
            fields = (meta.get("lora_service_version"), meta.get("lora_service_journal_seq"),
                      meta.get("lora_service_journal_hash"))
    except (OSError, ValueError, AttributeError):
        return None
    version, seq, digest = fields
    if isinstance(seq, str) and seq.isdigit():
        seq = int(seq)
    if not (isinstance(version, str) and type(seq) is int and isinstance(digest, str)):
        return None
    return Witness(path, version, seq, digest)


def find(paths: tuple[Path, ...]) -> list[Witness]:
    """The witnesses among `paths`: a file must be one (UsageError otherwise); a folder is
    searched for `*.safetensors` and `card.json`, skipping files that carry none."""
    found: list[Witness] = []
    for path in paths:
        if not path.is_dir():
            witness = read(path)
            if witness is None:
                raise UsageError(f"{path}: carries no journal witness (not a lora-service "
                                 "version file: kohya or peft .safetensors, or card.json)")
            found.append(witness)
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
    if sha256_file(witness.path) not in recorded:
        problems.append(f"{name}: its sha256 is none of the files {witness.version}'s "
                        "VersionCreated recorded (the file or that event changed)")
    return problems
