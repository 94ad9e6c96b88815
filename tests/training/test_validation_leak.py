"""Issue 13 item 10: an image held out for validation in one batch is never trained, even when
the same bytes come again in another batch whose own split would train them."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

from PIL import Image

from lora_service.daemon.foreground import train_now
from lora_service.daemon.plan import plan_run
from lora_service.daemon.split import _rank, validation_set
from lora_service.journal import Journal
from lora_service.journal.events import BatchAccepted, ImageRecord, RunStarted
from lora_service.training.run import _items, find_run

from .conftest import write_tiny_config

SPLIT = 0.25  # a 4-image batch holds out exactly one


def _png(i: int) -> bytes:
    img = Image.new("RGB", (32, 32), ((i * 53) % 256, (i * 97) % 256, (i * 31) % 256))
    img.putpixel((i % 32, (i * 7) % 32), (255, 255, 255))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _accept(state: Path, name: str, pngs: list[bytes]) -> str:
    """Write the images into the state as an accepted batch (what the intake leaves)."""
    records = [ImageRecord(file=f"{name}{i}.png", sha256=hashlib.sha256(data).hexdigest(),
                           caption=f"a square {name} {i}", caption_source="sidecar",
                           width=32, height=32) for i, data in enumerate(pngs)]
    batch_id = hashlib.sha256("".join(r.sha256 + r.caption for r in records).encode()).hexdigest()
    batch_id = batch_id[:16]
    folder = state / "batches" / batch_id
    folder.mkdir(parents=True)
    for record, data in zip(records, pngs, strict=True):
        (folder / record.file).write_bytes(data)
    with Journal.for_state(state) as journal:
        journal.append(BatchAccepted(
            name=name, batch_id=batch_id, images=tuple(records), moved_to=f".accepted/{name}",
            files={f"batches/{batch_id}/{r.file}": r.sha256 for r in records}))
    return batch_id


def _trained_shas(state: Path, version: str) -> set[str]:
    card = json.loads((state / "versions" / version / "card.json").read_text())
    return {sha for path, sha in card["manifest"].items() if path.endswith(".png")}


def test_an_image_held_out_anywhere_is_never_trained(tmp_path: Path, base_cache: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(base_cache, state / "base")
    config = write_tiny_config(tmp_path, {"validation_split": SPLIT, "rehearsal_ratio": 1.0,
                                          "epochs": 1, "incremental_epochs": 1, "max_steps": 2})
    # by the split's rank: x is held out among a-images ranked after it, trained among b and c
    # images of which one ranks before it
    pngs = sorted((_png(i) for i in range(40)), key=lambda d: _rank(hashlib.sha256(d).hexdigest()))
    x, after, before = pngs[10], pngs[11:], pngs[:10]
    x_sha = hashlib.sha256(x).hexdigest()
    a = _accept(state, "a", [x, *after[:3]])
    b = _accept(state, "b", [before[0], x, *after[3:5]])
    assert validation_set([hashlib.sha256(d).hexdigest() for d in [x, *after[:3]]], SPLIT) == {
        x_sha}
    assert x_sha not in validation_set(
        [hashlib.sha256(d).hexdigest() for d in [before[0], x, *after[3:5]]], SPLIT)

    # one run on both batches: b's copy of x does not train
    assert train_now(config) == 0
    assert x_sha not in _trained_shas(state, "v0001") and len(_trained_shas(state, "v0001")) == 5
    with Journal.for_state(state) as journal:
        run = find_run(journal, "r0001")
        assert set(run.batches) == {a, b} and run.held_out_elsewhere == (x_sha,)
        assert run.images == 3 + 2

    # an increment rehearsing every old image, with x in a third batch too: still never trained
    c = _accept(state, "c", [before[1], x, *after[5:7]])
    assert train_now(config) == 0
    with Journal.for_state(state) as journal:
        run = find_run(journal, "r0002")
        assert run.batches == (c,) and run.held_out_elsewhere == (x_sha,)
        assert not [n for n in run.rehearsal_images if n.endswith(("a0.png", "b1.png"))]
    trained = _trained_shas(state, "v0002")
    assert x_sha not in trained and len(trained) == 2 + 5  # c's two, all five old ones
    card = json.loads((state / "versions/v0002/card.json").read_text())  # item 11's inputs
    assert set(card["parent_val_loss_per_batch"]) == {a, b} and card["unchecked_batches"] == []

    # a fresh lineage relearns every batch: the plan and the child's training set leave x out
    with Journal.for_state(state) as journal:
        fresh = plan_run(journal, config, fresh=True)
        assert isinstance(fresh, RunStarted) and fresh.fresh
        journal.append(fresh)
        train, val = _items(journal, find_run(journal, fresh.run_id), SPLIT)
        assert x_sha not in {i.sha256 for i in train} and len(train) == fresh.images == 7
        assert x_sha in {i.sha256 for i in val}
