"""Issue 13 item 12: rehearsal is sized by the new data, rotates to other old images each run
(seeded by the run and journaled in `RunStarted`), and the child trains exactly those picks."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lora_service.config import Config
from lora_service.daemon.plan import plan_run
from lora_service.daemon.split import rehearsal_key, validation_set
from lora_service.journal import Journal
from lora_service.journal.events import (
    BatchAccepted,
    HeadMoved,
    ImageRecord,
    RunStarted,
    VersionCreated,
)
from lora_service.training.run import _items, find_run

from .conftest import write_tiny_config

BASE = "f" * 64


def _batch(journal: Journal, name: str, n: int) -> str:
    images = tuple(
        ImageRecord(file=f"{i:04d}.png", sha256=hashlib.sha256(f"{name}/{i}".encode()).hexdigest(),
                    caption=f"{name} {i}", caption_source="sidecar", width=32, height=32)
        for i in range(n)
    )
    journal.append(BatchAccepted(name=name, batch_id=name, images=images,
                                 moved_to=f".accepted/{name}"))
    return name


def _trained(journal: Journal, config: Config) -> RunStarted:
    """Plan the next run, journal it, and its version as promoted (what the child adds)."""
    run = plan_run(journal, config, base_sha256=BASE)
    assert run is not None
    version = f"v{int(run.run_id[1:]):04d}"
    journal.append(run)
    journal.append(
        VersionCreated(version=version, run_id=run.run_id, parent=run.parent,
                       batches=(*run.batches, *run.rehearsal), new_batches=run.batches,
                       images=run.images, step=run.start_step + run.total_steps,
                       steps=run.total_steps, train_loss=None, val_loss=None, base_sha256=BASE),
        HeadMoved(version=version, previous=run.parent, reason="test", by="promotion"),
    )
    return run


def _old_pool(journal: Journal, batches: list[str], split: float) -> list[str]:
    """Every training image (batch/file by sha256) of the given batches, validation excluded."""
    out = []
    for b in batches:
        rows = journal.query("SELECT file, sha256 FROM batch_images WHERE batch_id = ?", [b])
        held = validation_set((r["sha256"] for r in rows), split)
        out += [(r["sha256"], f"{b}/{r['file']}") for r in rows if r["sha256"] not in held]
    return out


def test_rehearsal_rotates_per_run_and_is_sized_by_the_new_data(tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path, {"validation_split": 0.1, "rehearsal_ratio": 0.25,
                                          "seed": 3})
    journal = Journal.for_state(config.paths.state)
    _batch(journal, "old", 1000)
    first = _trained(journal, config)
    assert first.rehearsal_images == () and first.images == 900  # 100 held out

    _batch(journal, "new1", 20)  # 18 train, 2 held out
    r2 = _trained(journal, config)
    # old images are a quarter of the run: 0.25 x 18 / 0.75 = 6 (not 25 % of all 900 old ones)
    assert len(r2.rehearsal_images) == 6 and r2.images == 18 + 6
    assert r2.rehearsal == ("old",)

    _batch(journal, "new2", 40)  # 36 train
    again = plan_run(journal, config, base_sha256=BASE)
    r3 = _trained(journal, config)
    assert again == r3  # the same journal plans the same run, picks included
    assert len(r3.rehearsal_images) == 12 and r3.images == 36 + 12

    # each run's picks come from its own journaled seed, so consecutive runs rotate
    assert r2.rehearsal_seed != r3.rehearsal_seed
    for run, known in ((r2, ["old"]), (r3, ["old", "new1"])):
        assert isinstance(run.rehearsal_seed, int)
        pool = sorted(_old_pool(journal, known, 0.1),
                      key=lambda p: rehearsal_key(run.rehearsal_seed, p[0]))
        take = len(run.rehearsal_images)
        assert sorted(name for _, name in pool[:take]) == list(run.rehearsal_images)
    r2_old = set(r2.rehearsal_images)
    r3_old = {n for n in r3.rehearsal_images if n.startswith("old/")}
    assert r2_old != r3_old and not r2_old & r3_old
    journal.close()


def test_the_child_and_a_resume_train_the_journaled_picks(tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path, {"validation_split": 0.1, "rehearsal_ratio": 0.5})
    journal = Journal.for_state(config.paths.state)
    _batch(journal, "old", 50)
    _trained(journal, config)
    _batch(journal, "new", 10)
    planned = plan_run(journal, config, base_sha256=BASE)
    assert planned is not None
    journal.append(planned)
    # the journal moves on while the run is interrupted: another batch, another config seed
    _batch(journal, "later", 10)
    reseeded = write_tiny_config(tmp_path, {"validation_split": 0.1, "rehearsal_ratio": 0.5,
                                            "seed": 99})
    run = find_run(journal, planned.run_id)  # what the child reads on start and on resume
    train, _ = _items(journal, run, reseeded.train.validation_split)
    trained_old = sorted(i.name for i in train if i.batch_id == "old")
    assert trained_old == list(planned.rehearsal_images) and len(trained_old) == 9
    assert len(train) == planned.images == 9 + 9
    journal.close()
