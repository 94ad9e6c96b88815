"""The journal: append-only, hash-chained, projections in step, tamper-evident."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lora_service.journal import Journal
from lora_service.journal import events as ev
from lora_service.journal.projections import TABLES, snapshot
from lora_service.journal.verify import rebuild, verify

APPENDER = Path(__file__).with_name("appender.py")


def accepted(name: str, state: Path) -> ev.BatchAccepted:
    """A BatchAccepted whose stored file really exists under state/."""
    rel = f"batches/{name}/a.png"
    (state / "batches" / name).mkdir(parents=True, exist_ok=True)
    (state / rel).write_bytes(b"image-" + name.encode())
    from lora_service.store import sha256_file

    sha = sha256_file(state / rel)
    image = ev.ImageRecord(file="a.png", sha256=sha, caption="a cat", caption_source="sidecar",
                           width=32, height=32)
    return ev.BatchAccepted(name=name, batch_id=name, images=(image,),
                            moved_to=f".accepted/{name}", files={rel: sha})


def test_append_assigns_seqs_and_chains_hashes(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    seqs = journal.append(ev.ServiceStarted(version="t", pid=1, config_hash="c"))
    seqs += journal.append(ev.BatchDetected(name="a"), ev.BatchDetected(name="b"))
    assert seqs == [1, 2, 3]
    stored = list(journal.events())
    assert [s.seq for s in stored] == [1, 2, 3]
    assert stored[1].prev_hash == stored[0].hash and stored[2].prev_hash == stored[1].hash
    assert isinstance(stored[2].event, ev.BatchDetected) and stored[2].event.name == "b"
    assert [s.seq for s in journal.events(since=2)] == [3]
    assert verify(journal, tmp_path).ok


def test_pragmas_are_set(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    assert journal.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert journal.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert journal.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000


@pytest.mark.parametrize(
    "sql",
    ["UPDATE events SET payload = '{}' WHERE seq = 1", "DELETE FROM events WHERE seq = 1"],
)
def test_update_and_delete_are_refused(tmp_path: Path, sql: str) -> None:
    journal = Journal.for_state(tmp_path)
    journal.append(ev.BatchDetected(name="a"))
    raw = sqlite3.connect(tmp_path / "journal.sqlite")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute(sql)
    raw.close()
    assert [s.event for s in journal.events()] == [ev.BatchDetected(name="a")]


def _tamper(state: Path, sql: str) -> None:
    raw = sqlite3.connect(state / "journal.sqlite")
    raw.execute("DROP TRIGGER events_no_update")
    raw.execute(sql)
    raw.commit()
    raw.close()


def test_verify_names_the_seq_of_a_changed_payload_byte(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    journal.append(*(ev.BatchDetected(name=f"batch{i}") for i in range(5)))
    journal.close()
    # one byte of event 3's payload: batch2 -> batch3
    _tamper(
        tmp_path, "UPDATE events SET payload = replace(payload, 'batch2', 'batch3') WHERE seq = 3"
    )
    report = verify(Journal.for_state(tmp_path), tmp_path)
    assert not report.ok
    assert any(p.startswith("event seq 3 ") and "hash mismatch" in p for p in report.problems)
    assert not any("seq 2 " in p or "seq 4 " in p for p in report.problems)
    # the projection row for that intake no longer matches its rebuild either
    assert any("projection intakes row 3" in p for p in report.problems)


def test_verify_detects_a_changed_projection_row(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    journal.append(accepted("b1", tmp_path))
    journal.conn.execute("UPDATE batches SET images = 99 WHERE batch_id = 'b1'")
    report = verify(journal, tmp_path)
    assert report.problems == ["projection batches row 'b1' differs from its rebuild from events"]


def test_verify_names_a_missing_or_changed_file(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    journal.append(accepted("b1", tmp_path), accepted("b2", tmp_path))
    assert verify(journal, tmp_path).ok
    (tmp_path / "batches/b1/a.png").unlink()
    (tmp_path / "batches/b2/a.png").write_bytes(b"changed")
    problems = verify(journal, tmp_path).problems
    assert problems == [
        "file batches/b1/a.png: missing (recorded by event seq 1)",
        "file batches/b2/a.png: sha256 differs from event seq 2",
    ]


def test_released_files_are_not_checked(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    (tmp_path / "runs/r1/checkpoints/step-000002").mkdir(parents=True)
    f = tmp_path / "runs/r1/checkpoints/step-000002/adapter.safetensors"
    f.write_bytes(b"w")
    from lora_service.store import sha256_file

    rel = "runs/r1/checkpoints/step-000002/adapter.safetensors"
    journal.append(ev.CheckpointSaved(run_id="r1", step=2, path=str(Path(rel).parent),
                                      files={rel: sha256_file(f)}))
    f.unlink()
    assert not verify(journal, tmp_path).ok
    journal.append(ev.CheckpointSaved(run_id="r1", step=4, path="runs/r1/checkpoints/step-000004",
                                      released=(rel,)))
    report = verify(journal, tmp_path)
    assert report.ok, report.problems
    rows = journal.query("SELECT step, released FROM checkpoints ORDER BY step")
    assert rows == [{"step": 2, "released": 1}, {"step": 4, "released": 0}]


def test_an_append_is_all_or_nothing(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    journal.append(ev.BatchDetected(name="a"))

    class Broken(ev.BatchDetected):
        def payload(self) -> dict:
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError):
        journal.append(ev.BatchDetected(name="b"), Broken(name="c"))
    assert journal.last_seq() == 1
    assert [r["name"] for r in journal.query("SELECT name FROM intakes")] == ["a"]
    assert verify(journal, tmp_path).ok


def test_projections_equal_their_rebuild(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    journal.append(accepted("b1", tmp_path), ev.BatchRequeued(batch_id="b1", reason="r"))
    rebuilt = rebuild(journal)
    for table in TABLES:
        assert snapshot(journal.conn, table) == snapshot(rebuilt, table), table


def test_three_processes_append_500_each_into_one_chain(tmp_path: Path) -> None:
    Journal.for_state(tmp_path).close()
    procs = [
        subprocess.Popen([sys.executable, str(APPENDER), str(tmp_path), "500", f"p{i}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "locked" not in err
    acknowledged = sorted(int(line) for out, _ in outputs for line in out.split())
    assert acknowledged == list(range(1, 1501))
    journal = Journal.for_state(tmp_path)
    report = verify(journal, tmp_path)
    assert report.ok, report.problems
    assert report.events == 1500
