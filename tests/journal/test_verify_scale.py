"""`verify` streams (issue 14): the same findings whether a second process decodes the events
or this one does, memory that does not grow with the journal, and a bounded report when a
whole table differs. `bench/journal_scale.py` measures it at a million events."""

from __future__ import annotations

import json
import sqlite3
import tracemalloc
from pathlib import Path

import pytest

from lora_service.journal import Journal
from lora_service.journal import events as ev
from lora_service.journal import verify as verifying
from lora_service.journal.projections import TABLES, snapshot
from lora_service.journal.sqlite import event_hash
from lora_service.journal.verify import hash_of_text, rebuild, verify

BASE = "b" * 64


def _runs(journal: Journal, runs: int, steps: int, *, released: bool = True) -> None:
    """`runs` trained versions of `steps` logged losses each, with a checkpoint each that
    releases the previous one (an UPDATE by path), one transaction per run."""
    parent = None
    for r in range(runs):
        run_id, version = f"run-{r}", f"v{r + 1:04d}"
        events: list[ev.Event] = [ev.RunStarted(
            run_id=run_id, parent=parent, fresh=parent is None, batches=(), base_sha256=BASE,
            start_step=r * steps, total_steps=steps, learning_rate=1e-4, epochs=1, seed=r,
            threads=1, config={"n": r})]
        events += [ev.LossLogged(run_id=run_id, step=r * steps + k, loss=1.0 / k, lr=1e-4)
                   for k in range(1, steps + 1)]
        events.append(ev.CheckpointSaved(
            run_id=run_id, step=(r + 1) * steps, path=f"runs/{run_id}/ck",
            released=(f"runs/run-{r - 1}/ck/a",) if r and released else ()))
        events.append(ev.VersionCreated(
            version=version, run_id=run_id, parent=parent, batches=(), new_batches=(), images=1,
            step=(r + 1) * steps, steps=steps, train_loss=0.1, val_loss=None,
            base_sha256=BASE))
        events.append(ev.HeadMoved(version=version, previous=parent, reason="r", by="promotion"))
        journal.append(*events)
        parent = version


def _tamper(state: Path, *statements: str) -> None:
    """Raw SQL around the journal, its UPDATE trigger dropped for it and put back after."""
    raw = sqlite3.connect(state / "journal.sqlite")
    (trigger,) = raw.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'events_no_update'").fetchone()
    raw.execute("DROP TRIGGER events_no_update")
    for sql in statements:
        raw.execute(sql)
    raw.execute(trigger)
    raw.commit()
    raw.close()


def test_the_hash_of_the_stored_text_is_the_events_hash(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    journal.append(ev.LossLogged(run_id="r\u00e9\n\"x", step=3, loss=float("nan"), lr=1e-4),
                   ev.BatchDetected(name="caf\u00e9 \\ \u2603"))
    for stored in journal.events():
        text = journal.conn.execute("SELECT payload FROM events WHERE seq = ?",
                                    (stored.seq,)).fetchone()[0]
        assert hash_of_text(stored.prev_hash, stored.seq, stored.ts, stored.type, stored.schema,
                            text) == stored.hash == event_hash(
            stored.prev_hash, stored.seq, stored.ts, stored.type, stored.schema, stored.payload)


def test_a_second_process_finds_what_one_finds(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind of problem, found alike by the one-process pass and by the decoding process."""
    journal = Journal.for_state(tmp_path)
    _runs(journal, 6, 40)
    journal.append(*(ev.BatchDetected(name=f"b{i}") for i in range(5)))
    journal.close()
    _tamper(
        tmp_path,
        # a changed payload byte (hash mismatch, and a projection row differs)
        "UPDATE events SET payload = replace(payload, 'run-1', 'run-9') WHERE seq = 46",
        # a payload that is not JSON, an integer SQLite cannot hold, an unknown type
        "UPDATE events SET payload = '{not json' WHERE seq = 50",
        "UPDATE events SET payload = replace(payload, '\"step\":56', '\"step\":"
        "99999999999999999999') WHERE seq = 61",
        "UPDATE events SET type = 'NoSuchEvent' WHERE seq = 70",
        # a live projection row changed around the journal
        "UPDATE loss_points SET loss = 7 WHERE seq = 100",
    )
    reports = {}
    for parallel_from in (10**9, 0):
        monkeypatch.setattr(verifying, "PARALLEL_FROM", parallel_from)
        with Journal.for_state(tmp_path, mode="read") as reader:
            reports[parallel_from] = verify(reader, tmp_path)
    one, two = reports.values()
    assert one.problems == two.problems and one.events == two.events == reader_events(tmp_path)
    problems = one.problems
    assert "event seq 46 (LossLogged): hash mismatch (event changed)" in problems
    assert any(p.startswith("event seq 50: payload is not JSON") for p in problems)
    assert any(p.startswith("event seq 61: payload integer 99999999999999999999") for p in problems)
    assert "event seq 70: unknown event type 'NoSuchEvent'" in problems
    assert "projection loss_points row 100 differs from its rebuild from events" in problems
    # the chain's problems in seq order, before the projections'
    seqs = [int(p.split()[2].rstrip(":")) for p in problems if p.startswith("event seq")]
    assert seqs == sorted(seqs)


def reader_events(state: Path) -> int:
    with Journal.for_state(state, mode="read") as journal:
        return journal.last_seq()


def test_a_chunk_sqlite_refuses_is_replayed_event_by_event(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk's batched statements fail on a value SQLite cannot hold (here an integer over 64
    bits, let past the decoding's own check for it): the chunk is rolled back and replayed
    as the journal applies events, that event skipped and every other one kept."""
    monkeypatch.setattr(verifying, "CHUNK", 7)
    monkeypatch.setattr(verifying, "_LONG_RUN", b"no such run")
    journal = Journal.for_state(tmp_path)
    _runs(journal, 3, 10)
    journal.close()
    _tamper(tmp_path, "UPDATE events SET payload = replace(payload, '\"step\":11',"
                      " '\"step\":99999999999999999999') WHERE seq = 16")
    with Journal.for_state(tmp_path, mode="read") as reader:
        rebuilt = rebuild(reader)
        live = snapshot(reader.conn, "loss_points")
        assert snapshot(rebuilt, "loss_points") == [row for row in live if row[0] != 16]
        for table in set(TABLES) - {"loss_points"}:
            assert snapshot(rebuilt, table) == snapshot(reader.conn, table), table


def test_verify_names_a_payload_integer_sqlite_cannot_hold(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    _runs(journal, 3, 10)
    journal.close()
    _tamper(tmp_path, "UPDATE events SET payload = replace(payload, '\"step\":11',"
                      " '\"step\":99999999999999999999') WHERE seq = 16")
    with Journal.for_state(tmp_path, mode="read") as reader:
        problems = verify(reader, tmp_path).problems
    assert problems == [
        "event seq 16: payload integer 99999999999999999999 is outside SQLite's 64-bit range",
        "projection loss_points row 16 differs from its rebuild from events"]


def test_the_rebuild_indexes_an_update_by_a_column_that_is_not_the_key(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    _runs(journal, 4, 3)
    rebuilt = rebuild(journal)
    indexes = [r[0] for r in rebuilt.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'checkpoints'")]
    assert "rebuild_checkpoints_path" in indexes
    for table in TABLES:
        assert snapshot(journal.conn, table) == snapshot(rebuilt, table), table
    assert [r[0] for r in rebuilt.execute("SELECT released FROM checkpoints ORDER BY step")] == [
        1, 1, 1, 0]


def test_a_table_that_differs_everywhere_is_named_a_hundred_rows_at_most(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    _runs(journal, 3, 100)
    journal.conn.execute("UPDATE loss_points SET lr = 1")
    problems = verify(journal, tmp_path).problems
    named = [p for p in problems if p.startswith("projection loss_points row ")]
    assert len(named) == verifying.ROWS_NAMED == 100
    assert problems[-1] == "projection loss_points: 200 more rows differ from their rebuild"


def test_memory_does_not_grow_with_the_journal(tmp_path: Path) -> None:
    """Python's own allocations while verifying 4,000 and 16,000 loss points: the old verify
    held both sides of every table as lists, which grew with the journal."""
    peaks = []
    for runs in (10, 40):
        state = tmp_path / str(runs)
        with Journal.for_state(state) as journal:
            _runs(journal, runs, 400)
        with Journal.for_state(state, mode="read") as journal:
            tracemalloc.start()
            report = verify(journal, state)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        assert report.ok, report.problems
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_a_writer_adds_the_indexes_to_a_schema_2_journal_and_a_reader_does_not(
    tmp_path: Path,
) -> None:
    with Journal.for_state(tmp_path) as journal:
        _runs(journal, 2, 5)
    raw = sqlite3.connect(tmp_path / "journal.sqlite")
    raw.execute("DROP INDEX loss_points_by_run")
    raw.execute("DROP INDEX checkpoints_by_path")
    raw.execute("PRAGMA user_version = 2")  # what the previous release wrote
    raw.close()

    def indexes() -> list[str]:
        raw = sqlite3.connect(tmp_path / "journal.sqlite")
        try:
            return sorted(r[0] for r in raw.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))
        finally:
            raw.close()

    with Journal.for_state(tmp_path, mode="read") as reader:
        assert reader.query("SELECT count(*) AS n FROM loss_points") == [{"n": 10}]
        assert "schema: version 2, expected 3" in verify(reader, tmp_path).problems[0]
    assert indexes() == []
    Journal.for_state(tmp_path).close()
    assert indexes() == ["checkpoints_by_path", "loss_points_by_run"]
    with Journal.for_state(tmp_path, mode="read") as reader:
        assert verify(reader, tmp_path).ok


def test_verify_json_counts_every_event(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    _runs(journal, 2, 3)
    report = verify(journal, tmp_path)
    assert report.ok and report.events == journal.last_seq() == 2 * (3 + 4)
    assert json.dumps(report.problems) == "[]"


def test_when_the_second_process_dies_this_one_decodes_the_rest(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    _runs(journal, 4, 30)
    upto = journal.last_seq()
    decoding = verifying._Decoding(journal, upto)
    decoding.process.kill()
    chunks = list(decoding)
    assert not decoding.process.is_alive()
    whole = list(verifying._decode(journal.conn.execute(verifying.EVENT_ROWS + " ORDER BY seq")))
    assert [c.statements for c in chunks] == [c.statements for c in whole]
    assert chunks[0].first == 1 and chunks[-1].last == upto


def test_without_a_second_process_verify_decodes_here(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise OSError("no processes left")

    journal = Journal.for_state(tmp_path)
    _runs(journal, 3, 20)
    monkeypatch.setattr(verifying, "PARALLEL_FROM", 0)
    monkeypatch.setattr(verifying, "_cores", lambda: 2)
    monkeypatch.setattr(verifying, "_Decoding", refuse)
    report = verify(journal, tmp_path)
    assert report.ok and report.events == journal.last_seq()
