"""Stateful property test: whatever sequence of appends and reopens, projections == rebuild."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lora_service.journal import Journal
from lora_service.journal import events as ev
from lora_service.journal.projections import TABLES, snapshot
from lora_service.journal.verify import rebuild, verify

names = st.sampled_from(["a", "b", "c", "d"])
versions = st.sampled_from(["v0001", "v0002", "v0003"])
losses = st.floats(min_value=0, max_value=10, allow_nan=False)


def image(name: str) -> ev.ImageRecord:
    return ev.ImageRecord(file=f"{name}.png", sha256=name * 8, caption=f"caption {name}",
                          caption_source="sidecar", width=32, height=32)


class JournalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.journal = Journal.for_state(self.dir)
        self.appended = 0

    def teardown(self) -> None:
        self.journal.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def add(self, *events: ev.Event) -> None:
        self.journal.append(*events)
        self.appended += len(events)

    @rule(name=names)
    def intake(self, name: str) -> None:
        self.add(ev.BatchDetected(name=name))
        self.add(ev.BatchAccepted(name=name, batch_id=f"id-{name}", images=(image(name),),
                                  moved_to=f".accepted/{name}"))

    @rule(name=names, duplicate=st.booleans())
    def reject_or_duplicate(self, name: str, duplicate: bool) -> None:
        if duplicate:
            self.add(ev.BatchDuplicate(name=name, batch_id=f"id-{name}", duplicate_of=name,
                                       moved_to=f".accepted/{name}-1"))
        else:
            self.add(ev.BatchRejected(name=name, reason="no usable image",
                                      bad=(ev.BadFile(file="x.png", reason="truncated"),),
                                      moved_to=f".rejected/{name}"))

    @rule(run=st.sampled_from(["r1", "r2"]), step=st.integers(0, 50), loss=losses)
    def training(self, run: str, step: int, loss: float) -> None:
        self.add(
            ev.TrainingRequested(),
            ev.RunStarted(run_id=run, parent=None, fresh=False, batches=("id-a",),
                          base_sha256="b", start_step=0, total_steps=10, request_seq=1,
                          learning_rate=1e-4, epochs=1, seed=0, threads=1, config={"k": 1}),
            ev.LossLogged(run_id=run, step=step, loss=loss, lr=1e-4),
            ev.CheckpointSaved(run_id=run, step=step, path=f"runs/{run}/step",
                               released=(f"runs/{run}/old/x",)),
        )

    @rule(run=st.sampled_from(["r1", "r2"]), fail=st.booleans())
    def resume_or_fail(self, run: str, fail: bool) -> None:
        if fail:
            self.add(ev.RunFailed(run_id=run, reason="boom", attempt=2, gave_up=True))
        else:
            self.add(ev.RunResumed(run_id=run, from_step=4, checkpoint="runs/x"))

    @rule(version=versions, parent=st.none() | versions, loss=losses, held=st.booleans())
    def version(self, version: str, parent: str | None, loss: float, held: bool) -> None:
        self.add(ev.VersionCreated(version=version, run_id="r1", parent=parent,
                                   batches=("id-a", "id-b"), new_batches=("id-b",), images=2,
                                   step=10, steps=10, train_loss=loss, val_loss=loss,
                                   base_sha256="b"))
        if held:
            self.add(ev.VersionHeld(version=version, parent=parent, val_loss_known=loss,
                                    parent_val_loss_known=0.0, tolerance=0.05, reason="worse"))
        else:
            self.add(ev.HeadMoved(version=version, previous=parent, reason="promoted",
                                  by="promotion"))

    @rule(name=names)
    def requeue(self, name: str) -> None:
        self.add(ev.BatchRequeued(batch_id=f"id-{name}", reason="rollback"))

    @precondition(lambda self: self.appended > 0)
    @rule()
    def reopen(self) -> None:
        self.journal.close()
        self.journal = Journal.for_state(self.dir, check=True)

    @invariant()
    def projections_equal_rebuild(self) -> None:
        rebuilt = rebuild(self.journal)
        for table in TABLES:
            assert snapshot(self.journal.conn, table) == snapshot(rebuilt, table), table
        rebuilt.close()

    @invariant()
    def chain_is_whole(self) -> None:
        assert self.journal.last_seq() == self.appended
        report = verify(self.journal, self.dir)
        assert report.ok, report.problems


TestJournalMachine = JournalMachine.TestCase
TestJournalMachine.settings = settings(max_examples=30, stateful_step_count=15, deadline=None)
