"""`Journal.append(..., expect=Expect(seq))`: a decision read at `seq` is refused (StaleDecision,
nothing appended) once an event it depends on landed after `seq`, and accepted when only
unrelated events did. Each test uses two `Journal`s on one file, as two processes would."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lora_service.journal import Expect, Journal, JournalError, StaleDecision
from lora_service.journal import events as ev
from lora_service.journal.sqlite import HEAD_EVENTS

SHA = "e" * 64


def created(version: str, parent: str | None = None) -> ev.VersionCreated:
    return ev.VersionCreated(version=version, run_id=f"run-{version}", parent=parent,
                             batches=("b1",), new_batches=("b1",), images=2, step=4, steps=4,
                             train_loss=0.5, val_loss=0.4, base_sha256=SHA)


def moved(version: str, previous: str | None, by: str = "rollback") -> ev.HeadMoved:
    return ev.HeadMoved(version=version, previous=previous, reason="test", by=by)


def imported(version: str) -> ev.VersionImported:
    geometry = ev.ImportedGeometry(rank=4, alpha=8.0, target_modules=("to_q",),
                                   train_text_encoder=False)
    return ev.VersionImported(version=version, origin="x.safetensors", format="kohya",
                              sha256=SHA, origin_files={"x.safetensors": SHA},
                              geometry=geometry, modules=1, base_sha256=SHA)


# one event of each type a decision on the head depends on
HEAD_MOVES: dict[str, Callable[[], ev.Event]] = {
    "HeadMoved": lambda: moved("v0001", "v0002"),
    "VersionCreated": lambda: created("v0003", "v0002"),
    "VersionImported": lambda: imported("v0003"),
    "BatchRequeued": lambda: ev.BatchRequeued(batch_id="b1", reason="test"),
}

UNRELATED: tuple[Callable[[], ev.Event], ...] = (
    lambda: ev.LossLogged(run_id="run-v0003", step=1, loss=0.3, lr=1e-4),
    lambda: ev.BatchDetected(name="more-cats"),
    lambda: ev.TrainingRequested(reason="manual"),
    lambda: ev.VersionExported(version="v0002", path="/elsewhere/x.safetensors", sha256=SHA),
)


def two_versions(state: Path) -> tuple[Journal, Journal]:
    """A journal whose head is v0002 (v0001 before it), opened twice."""
    journal = Journal.for_state(state)
    journal.append(created("v0001"), moved("v0001", None, "promotion"))
    journal.append(created("v0002", "v0001"), moved("v0002", "v0001", "promotion"))
    return journal, Journal.for_state(state)


def head(journal: Journal) -> str | None:
    rows = journal.query("SELECT version FROM head")
    return rows[0]["version"] if rows else None


def test_expect_covers_what_a_head_decision_reads() -> None:
    assert set(HEAD_MOVES) == set(HEAD_EVENTS)
    assert Expect(7).types == HEAD_EVENTS
    assert issubclass(StaleDecision, JournalError)


@pytest.mark.parametrize("kind", sorted(HEAD_MOVES))
def test_a_decision_is_refused_after_a_head_event_landed(tmp_path: Path, kind: str) -> None:
    mine, other = two_versions(tmp_path)
    read_at = mine.last_seq()
    decided_on = head(mine)
    assert decided_on == "v0002"

    (landed,) = other.append(HEAD_MOVES[kind]())  # lands between our read and our append
    other.append(ev.LossLogged(run_id="r", step=1, loss=0.1, lr=1e-4))  # and noise after it
    last, snapshot = mine.last_seq(), list(mine.events())
    head_before = head(mine)

    with pytest.raises(StaleDecision) as refused:
        mine.append(created("v0009", decided_on), moved("v0009", decided_on, "promotion"),
                    expect=Expect(read_at))
    message = str(refused.value)
    assert f"seq {read_at}" in message and f"{kind} was appended at seq {landed}" in message
    # nothing appended, neither event of the two: the chain and the projections are as before
    assert mine.last_seq() == last == other.last_seq()
    assert list(mine.events()) == snapshot
    assert mine.projected_seq() == last
    assert head(mine) == head_before
    assert not mine.query("SELECT 1 AS x FROM versions WHERE version = 'v0009'")

    # the caller re-reads and decides again: accepted at the new position
    read_at = mine.last_seq()
    current = head(mine)
    seqs = mine.append(created("v0009", current), moved("v0009", current, "promotion"),
                       expect=Expect(read_at))
    assert seqs == [read_at + 1, read_at + 2]
    assert head(other) == "v0009"


def test_a_decision_is_accepted_after_only_unrelated_events(tmp_path: Path) -> None:
    mine, other = two_versions(tmp_path)
    read_at = mine.last_seq()
    for make in UNRELATED:
        other.append(make())
    other.append(*(make() for make in UNRELATED))
    assert mine.last_seq() == read_at + 2 * len(UNRELATED)

    seqs = mine.append(moved("v0001", "v0002"), expect=Expect(read_at))
    assert seqs == [read_at + 2 * len(UNRELATED) + 1]
    assert head(other) == "v0001"
    assert other.projected_seq() == seqs[0]


def test_a_decision_at_the_last_seq_and_head_events_before_it_are_accepted(
    tmp_path: Path,
) -> None:
    mine, _other = two_versions(tmp_path)  # HeadMoved at seqs 2 and 4, all before the read
    read_at = mine.last_seq()
    assert mine.append(moved("v0001", "v0002"), expect=Expect(read_at)) == [read_at + 1]
    # a decision read before that move is now stale, one read at it is not
    with pytest.raises(StaleDecision):
        mine.append(moved("v0002", "v0001"), expect=Expect(read_at))
    assert mine.append(moved("v0002", "v0001"), expect=Expect(read_at + 1)) == [read_at + 2]
    assert head(mine) == "v0002"


def test_an_empty_journal_takes_a_decision_read_at_zero(tmp_path: Path) -> None:
    journal = Journal.for_state(tmp_path)
    assert journal.append(created("v0001"), moved("v0001", None, "promotion"),
                          expect=Expect(0)) == [1, 2]
    with pytest.raises(StaleDecision):
        journal.append(created("v0002", "v0001"), expect=Expect(0))
    assert journal.last_seq() == 2


def test_custom_types_choose_what_makes_a_decision_stale(tmp_path: Path) -> None:
    mine, other = two_versions(tmp_path)
    read_at = mine.last_seq()
    other.append(ev.BatchDetected(name="cats"))
    last = mine.last_seq()

    # a decision about intake depends on BatchDetected: refused
    with pytest.raises(StaleDecision, match="BatchDetected was appended"):
        mine.append(ev.TrainingRequested(reason="arrival"),
                    expect=Expect(read_at, types=("BatchDetected", "BatchAccepted")))
    assert mine.last_seq() == last

    # the default (head) types do not include it: accepted
    assert mine.append(moved("v0001", "v0002"), expect=Expect(read_at)) == [last + 1]

    # a decision that names only LossLogged ignores the head move that just landed ...
    read_at = last
    (seq,) = mine.append(ev.TrainingRequested(reason="manual"),
                         expect=Expect(read_at, types=("LossLogged",)))
    assert seq == last + 2
    # ... and an empty list of types never refuses
    assert mine.append(ev.BatchDetected(name="x"), expect=Expect(0, types=())) == [seq + 1]
