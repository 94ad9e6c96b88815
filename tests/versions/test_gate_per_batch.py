"""Issue 13 item 11: the gate checks every batch the parent knew, not only the pooled mean; it
names the batches it could not check; `status` says when the head has no validation evidence."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from lora_service.cli import cli
from lora_service.config import Config, load_config
from lora_service.journal import Journal
from lora_service.journal.events import BatchAccepted, ImageRecord, RunStarted, VersionHeld
from lora_service.versions.gate import decide
from tests.versions.conftest import publish_version

BASE = "f" * 64


def test_one_batch_worse_holds_though_the_pooled_mean_is_fine() -> None:
    # nine batches unchanged, one 30 % worse: the pooled mean rises 3 %, under the 5 % tolerance
    parent = {f"b{i}": 1.0 for i in range(10)}
    child = {**parent, "b7": 1.3}
    ok, reason = decide("if_not_worse", 0.05, 1.03, 1.0, per_batch=child,
                        parent_per_batch=parent, unchecked=["tiny"])
    assert not ok and reason.startswith("held: batch b7 1.3 vs parent 1 (+30.0%)")
    assert "b6" not in reason and "unchecked (no validation image): tiny" in reason
    # within tolerance everywhere: promoted, and the reason still says what was not checked
    ok, reason = decide("if_not_worse", 0.05, 1.0, 1.0, per_batch=parent,
                        parent_per_batch=parent, unchecked=["tiny"])
    assert ok and "10 batches each within it" in reason and reason.endswith("tiny")


def _image(name: str, i: int) -> ImageRecord:
    return ImageRecord(file=f"{i}.png", sha256=f"{name}{i}".encode().hex().ljust(64, "0"),
                       caption=f"{name} {i}", caption_source="sidecar", width=32, height=32)


def _journal_run(journal: Journal, config: Config, run_id: str, parent: str | None,
                 batches: dict[str, int], start_step: int = 0) -> None:
    """Accept the batches (name -> image count) and journal a run on them, as the planner would."""
    for name, n in batches.items():
        journal.append(BatchAccepted(name=name, batch_id=name, moved_to=f".accepted/{name}",
                                     images=tuple(_image(name, i) for i in range(n))))
    journal.append(RunStarted(
        run_id=run_id, parent=parent, fresh=parent is None, batches=tuple(batches),
        base_sha256=BASE, start_step=start_step, total_steps=4,
        learning_rate=config.train.learning_rate, epochs=2, seed=0, threads=1,
        config=config.effective()))


def _publish(journal: Journal, config: Config, unet: Any, run_id: str, **val: Any) -> str:
    kw: dict[str, Any] = {"step": 4, "steps": 4, "epochs": 2, "train_loss": 0.5, "images": 4,
                          "manifest": {}, "started_at": "2025-01-01T00:00:00.000000Z",
                          "finished_at": "2025-01-01T00:00:05.000000Z"}
    return publish_version(journal, config, run_id=run_id, unet=unet, **kw, **val)


def _status(config: Path) -> tuple[dict[str, Any], str]:
    args = ["status", "--config", str(config)]
    as_json = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    text = CliRunner().invoke(cli, args, catch_exceptions=False)
    return json.loads(as_json.output), text.output


def test_held_naming_the_worse_batch_unchecked_named_and_status_unverified(
    write_config: Callable[..., Path], lora_unet: Callable[..., Any]
) -> None:
    path = write_config({"lora": {"rank": 4, "alpha": 8.0}})
    config = load_config(path)
    state = config.paths.state
    journal = Journal.for_state(state)

    # v1 learned only one-image batches: nothing held out, so no validation evidence at all
    _journal_run(journal, config, "r1", None, {"solo1": 1, "solo2": 1})
    v1 = _publish(journal, config, lora_unet(), "r1", val_loss=None, val_loss_per_batch={},
                  val_loss_known=None, parent_val_loss_known=None)
    card = json.loads((state / "versions" / v1 / "card.json").read_text())
    assert card["unchecked_batches"] == ["solo1", "solo2"]
    info, text = _status(path)
    assert info["head"]["version"] == v1 and info["head"]["verified"] is False
    assert f"unverified: {v1} has no validation loss" in text

    # v2 adds two larger batches: validated, so the head is verified
    _journal_run(journal, config, "r2", v1, {"big1": 4, "big2": 4}, start_step=4)
    v2 = _publish(journal, config, lora_unet(seed=2), "r2", val_loss=1.0,
                  val_loss_per_batch={"big1": 1.0, "big2": 1.0}, val_loss_known=None,
                  parent_val_loss_known=None, parent_val_loss_per_batch={})
    info, text = _status(path)
    assert info["head"]["version"] == v2 and info["head"]["verified"] is True
    assert "unverified" not in text

    # v3: pooled loss on what v2 knew is 2 % worse (fine), but big2 alone is 20 % worse: held
    _journal_run(journal, config, "r3", v2, {"new": 4}, start_step=8)
    v3 = _publish(journal, config, lora_unet(seed=3), "r3", val_loss=1.0,
                  val_loss_per_batch={"big1": 0.84, "big2": 1.2, "new": 0.9},
                  val_loss_known=1.02, parent_val_loss_known=1.0,
                  parent_val_loss_per_batch={"big1": 1.0, "big2": 1.0})
    held = [e.event for e in journal.events(types=("VersionHeld",))]
    assert [h.version for h in held] == [v3]
    event = held[0]
    assert isinstance(event, VersionHeld)
    assert event.worse_batches == ("big2",) and "batch big2 1.2 vs parent 1" in event.reason
    assert "big1" not in event.reason.split("(val_loss_known")[0]
    assert event.unchecked_batches == ("solo1", "solo2")
    assert event.parent_val_loss_per_batch == {"big1": 1.0, "big2": 1.0}
    card = json.loads((state / "versions" / v3 / "card.json").read_text())
    assert card["unchecked_batches"] == ["solo1", "solo2"] and card["worse_batches"] == ["big2"]
    info, _ = _status(path)
    assert info["head"]["version"] == v2 and info["held"][0]["version"] == v3
    journal.close()
