"""Witnesses (item 15): published files remember the journal position, and `verify --witness`
catches a journal tail that was rewritten with recomputed hashes, or cut off, which `verify`
alone cannot (the forged chain is consistent)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lora_service.config import Config, load_config
from lora_service.journal import Journal, projections
from lora_service.journal import events as ev
from lora_service.journal.events import decode
from lora_service.journal.sqlite import GENESIS, event_hash
from lora_service.store import sha256_file
from lora_service.versions.export import export_version
from tests.versions.conftest import publish_version

Row = tuple[int, str, str, int, dict[str, Any]]  # seq, ts, type, schema, payload


def lora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lora_service", *args],
                          capture_output=True, text=True, timeout=120)


def forge(state: Path, edit: Callable[[list[Row]], list[Row]]) -> None:
    """What someone who can write the journal file does: edit events, recompute every hash
    after the edit, rebuild every projection from the edited events, put the append-only
    triggers back as they were (`verify` checks them)."""
    raw = sqlite3.connect(state / "journal.sqlite", isolation_level=None)
    rows = [(seq, ts, type_, schema, json.loads(payload)) for seq, ts, type_, schema, payload
            in raw.execute("SELECT seq, ts, type, schema, payload FROM events ORDER BY seq")]
    raw.execute("BEGIN")
    triggers = raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for name, _sql in triggers:
        raw.execute(f"DROP TRIGGER {name}")
    for table in [*projections.TABLES, "events", "position"]:
        raw.execute(f"DELETE FROM {table}")
    prev = GENESIS
    for seq, ts, type_, schema, payload in edit(rows):
        digest = event_hash(prev, seq, ts, type_, schema, payload)
        raw.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, ts, type_, schema, projections.canonical(payload), prev, digest))
        projections.apply(raw, projections.changes(seq, ts, decode(type_, payload)))
        raw.execute("INSERT OR REPLACE INTO position (id, seq) VALUES (1, ?)", (seq,))
        prev = digest
    for _name, sql in triggers:
        raw.execute(sql)
    raw.execute("COMMIT")
    raw.close()


@pytest.fixture
def published(
    write_config: Callable[..., Path],
    lora_unet: Callable[..., Any],
    start_run: Callable[..., None],
    publish_kwargs: Callable[..., dict[str, Any]],
    tmp_path: Path,
) -> tuple[Config, dict[str, int]]:
    """v0001 and v0002 published and deployed, v0002 exported as kohya and peft; the seq of
    each version's VersionCreated."""
    config = load_config(write_config({
        "name": "demo", "paths": {"deploy_dir": "../deploy"}, "lora": {"rank": 4, "alpha": 8.0},
        "train": {"promote": "always"},
    }))
    created = {}
    with Journal.for_state(config.paths.state) as journal:
        for run_id, parent, seed in (("r1", None, 1), ("r2", "v0001", 2)):
            start_run(journal, config, run_id, parent)
            version = publish_version(journal, config, run_id=run_id, unet=lora_unet(seed=seed),
                                      **publish_kwargs())
            created[version] = journal.last_seq() - 2  # VersionCreated, HeadMoved, deployed
        (tmp_path / "exported").mkdir()
        export_version(journal, config, "v0002", "kohya", tmp_path / "exported")
        export_version(journal, config, "v0002", "peft", tmp_path / "exported" / "peft")
    return config, created


def test_every_published_file_and_copy_carries_the_position_it_was_decided_on(
    published: tuple[Config, dict[str, int]], tmp_path: Path
) -> None:
    from lora_service.versions import witness

    config, created = published
    state = config.paths.state
    with Journal.for_state(state, mode="read") as journal:
        for version, seq in created.items():
            folder = state / "versions" / version
            files = [folder / f"demo-{version}.safetensors", folder / "card.json",
                     folder / "adapter" / "adapter_model.safetensors"]
            for path in files:
                seen = witness.read(path)
                digest = sha256_file(path)
                assert seen == witness.Witness(path, version, seq - 1, journal.hash_at(seq - 1),
                                               digest)
                assert seen.sha256 == digest
    deployed = witness.read(tmp_path / "deploy" / "demo.safetensors")
    assert deployed is not None
    assert (deployed.version, deployed.seq) == ("v0002", created["v0002"] - 1)

    config_path = str(config.source)
    ok = lora("verify", "--witness", str(tmp_path / "deploy"), str(tmp_path / "exported"),
              str(state / "versions"), "--config", config_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # deploy 1, exported kohya and peft 2, per version: kohya, adapter weights, card
    assert ok.stdout.splitlines()[-1].endswith(" files, 9 witnesses checked")

    bad = lora("verify", "--witness", str(state / "versions" / "v0001" / "adapter" /
               "adapter_config.json"), "--config", config_path)
    assert bad.returncode == 2 and "carries no journal witness" in bad.stderr
    assert lora("verify", "--witness", "--config", config_path).returncode == 2


def test_a_rewritten_tail_passes_verify_but_not_its_witnesses(
    published: tuple[Config, dict[str, int]], tmp_path: Path
) -> None:
    config, created = published
    state = config.paths.state
    elsewhere = tmp_path / "backup.safetensors"
    shutil.copy(state / "versions" / "v0002" / "demo-v0002.safetensors", elsewhere)
    v1_copy = tmp_path / "v1.safetensors"
    shutil.copy(state / "versions" / "v0001" / "demo-v0001.safetensors", v1_copy)
    config_path = str(config.source)

    def better_v1(rows: list[Row]) -> list[Row]:
        """v0001's recorded train loss, improved after the fact."""
        for seq, _ts, type_, _schema, payload in rows:
            if type_ == "VersionCreated" and payload["version"] == "v0001":
                assert seq == created["v0001"]
                payload["train_loss"] = 0.01
        return rows

    forge(state, better_v1)
    alone = lora("verify", "--config", config_path)
    assert alone.returncode == 0, alone.stdout  # the forged chain is consistent

    caught = lora("verify", "--witness", str(elsewhere), "--config", config_path)
    assert caught.returncode == 1
    witnessed = created["v0002"] - 1
    assert caught.stdout.splitlines()[0].startswith(
        f"{elsewhere}: seq {witnessed} has hash "
    ) and caught.stdout.splitlines()[0].endswith(f"(events up to seq {witnessed} were rewritten)")
    assert caught.stdout.splitlines()[-1].startswith("FAILED: 1 problems")
    # the limit: v0001's own files were decided before the rewritten event
    assert lora("verify", "--witness", str(v1_copy), "--config", config_path).returncode == 0


@pytest.mark.parametrize("cut", ["at the newest VersionCreated", "before the witnessed seq"])
def test_a_cut_off_tail_passes_verify_but_not_its_witnesses(
    published: tuple[Config, dict[str, int]], tmp_path: Path, cut: str
) -> None:
    config, created = published
    state = config.paths.state
    elsewhere = tmp_path / "deployed-before.safetensors"
    shutil.copy(tmp_path / "deploy" / "demo.safetensors", elsewhere)  # v0002
    keep = created["v0002"] - 1 if cut == "at the newest VersionCreated" else created["v0002"] - 2
    forge(state, lambda rows: rows[:keep])
    config_path = str(config.source)
    alone = lora("verify", "--config", config_path)
    assert alone.returncode == 0, alone.stdout

    caught = lora("verify", "--witness", str(elsewhere), "--config", config_path)
    assert caught.returncode == 1
    if cut == "at the newest VersionCreated":
        assert caught.stdout.splitlines()[0] == (
            f"{elsewhere}: v0002 is not in the journal (its VersionCreated was cut off or "
            "rewritten)"
        )
    else:
        assert caught.stdout.splitlines()[0] == (
            f"{elsewhere}: witnessed seq {keep + 1}, but the journal ends at seq {keep} "
            "(events were cut off)"
        )


def _safetensors(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def _witness_header(**changed: str) -> bytes:
    from lora_service.versions import witness

    meta = witness.metadata("v0001", 1, "0" * 64) | changed
    return _safetensors(json.dumps({"__metadata__": meta}).encode())


CRAFTED: dict[str, tuple[str, bytes]] = {  # file name, bytes; what each used to raise
    "seq '²' passes isdigit (int: ValueError)": (
        "x.safetensors", _witness_header(lora_service_journal_seq="²")),
    "seq of 5000 digits (int: digit limit)": (
        "x.safetensors", _witness_header(lora_service_journal_seq="9" * 5000)),
    "header nested 100k deep (json: RecursionError)": (
        "x.safetensors", _safetensors(b"[" * 100_000 + b"]" * 100_000)),
    "card nested 100k deep (json: RecursionError)": ("card.json", b"[" * 100_000),
    "version that writes to the terminal": (
        "x.safetensors", _witness_header(lora_service_version="\x1b]0;pwned\x07")),
    "hash that is not one": ("x.safetensors", _witness_header(lora_service_journal_hash="zz")),
    "seq past SQLite integers": ("card.json", json.dumps(
        {"version": "v0001", "journal_seq": 2**63, "journal_hash": "0" * 64}).encode()),
    "header longer than the file": ("x.safetensors", _witness_header()[:-1]),
}


@pytest.mark.parametrize("crafted", [*CRAFTED, "FIFO"])
def test_a_crafted_witness_file_is_one_line_naming_it(
    write_config: Callable[..., Path], tmp_path: Path, crafted: str
) -> None:
    """Exit 2 and one line naming the file; never a traceback, never a wait on a FIFO."""
    config = write_config()
    with Journal.for_state(tmp_path / "state") as journal:
        journal.append(ev.BatchDetected(name="one"))
    if crafted == "FIFO":
        path = tmp_path / "x.safetensors"
        os.mkfifo(path)
    else:
        name, data = CRAFTED[crafted]
        path = tmp_path / name
        path.write_bytes(data)
    result = subprocess.run(
        [sys.executable, "-m", "lora_service", "verify", "--witness", str(path), "--config",
         str(config)], capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"lora-service: {path}: carries no journal witness (")
    assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr


def test_a_folder_skips_what_is_not_a_witness_without_blocking(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config()
    with Journal.for_state(tmp_path / "state") as journal:
        journal.append(ev.BatchDetected(name="one"))
    folder = tmp_path / "deploy"
    folder.mkdir()
    os.mkfifo(folder / "a.safetensors")
    os.mkfifo(folder / "card.json")
    for i, (name, data) in enumerate(CRAFTED.values()):
        (folder / f"{i}-{name}").write_bytes(data)
    result = subprocess.run(
        [sys.executable, "-m", "lora_service", "verify", "--witness", str(folder), "--config",
         str(config)], capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no witness found" in result.stderr
