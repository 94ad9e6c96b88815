"""`loss` on a long curve (issue 14): downsampled in the journal to the lowest and highest loss
of equal step ranges, every spike kept; `--full` gives every point, streamed.

The journal is written directly (runs, losses, versions, a head), no training needed: three
versions of 2,000 steps, the second resumed from a checkpoint (its re-logged steps replace
the first attempt's), a NaN loss, a spike and a dip, and a run now training on the head."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lora_service.journal import Journal
from lora_service.journal import events as ev

ROOT = Path(__file__).resolve().parents[2]
BASE = "b" * 64
STEPS = 2000
SPIKE, DIP, SUPERSEDED, NAN_STEP = 1234, 4321, 99.0, 5555


def lora(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lora_service", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )


def lora_json(*args: str, config: Path) -> Any:
    result = lora(*args, "--json", config=config)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _loss(step: int) -> float:
    if step == SPIKE:
        return 50.0
    if step == DIP:
        return -3.0
    if step == NAN_STEP:
        return math.nan
    return 0.1 + 0.05 * math.sin(step / 37) + 0.02 * ((step * 7919) % 13) / 13


def _losses(run_id: str, steps: range) -> list[ev.Event]:
    return [ev.LossLogged(run_id=run_id, step=s, loss=_loss(s), lr=1e-4, images_per_s=2.0)
            for s in steps]


def _history(state: Path) -> None:
    parent = None
    with Journal.for_state(state) as journal:
        for r in range(3):
            run_id, version, start = f"run-{r}", f"v{r + 1:04d}", r * STEPS
            journal.append(ev.RunStarted(
                run_id=run_id, parent=parent, fresh=parent is None, batches=(),
                base_sha256=BASE, start_step=start, total_steps=STEPS, learning_rate=1e-4,
                epochs=1, seed=r, threads=1, config={}))
            if r == 1:  # killed after 600 steps, resumed from its checkpoint at 500
                first = _losses(run_id, range(start + 1, start + 601))
                journal.append(*(e.model_copy(update={"loss": SUPERSEDED})
                                 if e.step > start + 500 else e for e in first))
                journal.append(ev.RunFailed(run_id=run_id, reason="killed"),
                               ev.RunResumed(run_id=run_id, from_step=start + 500,
                                             checkpoint="ck"))
                journal.append(*_losses(run_id, range(start + 501, start + STEPS + 1)))
            else:
                journal.append(*_losses(run_id, range(start + 1, start + STEPS + 1)))
            journal.append(
                ev.VersionCreated(version=version, run_id=run_id, parent=parent, batches=(),
                                  new_batches=(), images=1, step=start + STEPS, steps=STEPS,
                                  train_loss=0.1, val_loss=0.2, base_sha256=BASE),
                ev.HeadMoved(version=version, previous=parent, reason="r", by="promotion"))
            parent = version
        journal.append(ev.RunStarted(
            run_id="run-now", parent=parent, fresh=False, batches=(), base_sha256=BASE,
            start_step=3 * STEPS, total_steps=STEPS, learning_rate=1e-4, epochs=1, seed=9,
            threads=1, config={}))
        journal.append(*_losses("run-now", range(3 * STEPS + 1, 3 * STEPS + 501)))


@pytest.fixture
def config(write_config: Callable[..., Path], tmp_path: Path) -> Path:
    path = write_config()
    _history(tmp_path / "state")
    return path


def _extremes(full: list[dict[str, Any]], lo: int, width: int) -> set[int]:
    """The seqs a min-max downsampling keeps, computed from the whole curve."""
    buckets: dict[int, list[dict[str, Any]]] = {}
    for p in full:
        buckets.setdefault((p["step"] - lo) // width, []).append(p)
    keep = set()
    for points in buckets.values():
        known = [p for p in points if p["loss"] is not None]
        if known:
            keep.add(min(known, key=lambda p: (p["loss"], p["step"]))["seq"])
            keep.add(min(known, key=lambda p: (-p["loss"], p["step"]))["seq"])
        nans = [p for p in points if p["loss"] is None]
        if nans:
            keep.add(nans[0]["seq"])
    return keep


def test_loss_is_downsampled_to_its_extremes_and_full_gives_every_point(config: Path) -> None:
    full = lora_json("loss", "--full", config=config)
    points = full["points"]
    assert full["downsampled"] is None and full["lineage"] == ["v0001", "v0002", "v0003"]
    assert len(points) == 3 * STEPS + 500 == len({p["step"] for p in points})
    assert [p["step"] for p in points] == sorted(p["step"] for p in points)
    assert SUPERSEDED not in {p["loss"] for p in points}  # the resumed run's later points count
    assert [p["step"] for p in points if p["loss"] is None] == [NAN_STEP]
    assert {p["version"] for p in points} == {"v0001", "v0002", "v0003", None}

    series = lora_json("loss", config=config)
    sampled = series["points"]
    assert series["downsampled"] == {"method": "min-max", "total_points": len(points),
                                     "buckets": 650, "bucket_steps": 10}
    assert 1000 < len(sampled) <= 2000
    assert {p["seq"] for p in sampled} == _extremes(points, points[0]["step"], 10)
    by_step = {p["step"]: p for p in sampled}
    assert by_step[SPIKE]["loss"] == 50.0 and by_step[DIP]["loss"] == -3.0
    assert by_step[NAN_STEP]["loss"] is None
    assert all(p == next(q for q in points if q["seq"] == p["seq"]) for p in sampled[:50])
    assert series["versions"] == full["versions"] and series["lineage"] == full["lineage"]

    few = lora_json("loss", "--points", "100", config=config)
    assert len(few["points"]) <= 100 and few["downsampled"]["buckets"] == 33
    v1 = lora_json("loss", "--version", "v0001", config=config)
    assert v1["downsampled"] is None and len(v1["points"]) == STEPS  # no more than 2,000


def test_without_its_index_a_journal_answers_the_same(config: Path, tmp_path: Path) -> None:
    indexed = lora_json("loss", config=config)
    raw = sqlite3.connect(tmp_path / "state" / "journal.sqlite")
    raw.execute("DROP INDEX loss_points_by_run")  # a schema 2 journal no writer opened yet
    raw.close()
    assert lora_json("loss", config=config) == indexed


def test_text_and_chart_of_a_long_curve(config: Path, tmp_path: Path) -> None:
    text = lora("loss", config=config)
    assert text.returncode == 0, text.stderr
    words = " ".join(text.stdout.split())  # the title may wrap
    assert f"(last 40 of {3 * STEPS + 500}; --json --full for all)" in words
    last = [line for line in text.stdout.splitlines() if "(training)" in line][-1]
    assert str(3 * STEPS + 500) in last
    plot = tmp_path / "loss.png"
    drawn = lora_json("loss", "--full", "--plot", str(plot), config=config)
    assert drawn["plot"] == str(plot) and len(drawn["points"]) == 3 * STEPS + 500
    with Image.open(plot) as image:
        image.load()
        assert image.format == "PNG" and image.size == (1200, 600)
