"""Processes that open a state at the same moment (the daemon creating it, a CLI command, the
test harness polling) all get the journal: none is refused with "database is locked"."""
from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from lora_service.journal.sqlite import Journal, JournalError, NoJournal

OPENERS = 4
ROUNDS = 60


def _open(state: Path, barrier: multiprocessing.synchronize.Barrier) -> str | None:
    barrier.wait()
    try:
        with Journal.for_state(state) as journal:
            return None if journal.last_seq() == 0 else "not empty"
    except Exception as exc:  # noqa: BLE001 - the message is what the test reports
        return str(exc)


def test_a_fresh_state_opened_by_several_processes_at_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    problems: list[str] = []
    with context.Manager() as manager, context.Pool(OPENERS) as pool:
        for round_ in range(ROUNDS):
            barrier = manager.Barrier(OPENERS)
            state = tmp_path / f"state{round_}"
            answers = pool.starmap(_open, [(state, barrier)] * OPENERS)
            problems += [answer for answer in answers if answer]
    assert problems == []


def test_a_reader_of_a_journal_still_being_created_sees_no_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    sqlite3.connect(state / "journal.sqlite").execute("PRAGMA journal_mode = WAL").close()
    with pytest.raises(NoJournal, match="no state at .*being created|daemon is creating it"):
        Journal.for_state(state, mode="read")
    other = sqlite3.connect(state / "journal.sqlite")
    other.execute("CREATE TABLE t (x)")
    other.close()
    with pytest.raises(JournalError, match="not a lora-service journal"):
        Journal.for_state(state, mode="read")
