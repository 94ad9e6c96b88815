"""Incremental runs: v2 continues v1 (its weights, its step, a reduced lr and epochs), a changed
LoRA geometry is refused naming the key, and `fresh` starts a new lineage on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_service.daemon.foreground import train_now
from lora_service.daemon.plan import plan_run
from lora_service.errors import UsageError
from lora_service.journal import Journal, queries
from lora_service.training.run import RunContext, find_run

from .conftest import add_batch, write_tiny_config

TRAIN = {"epochs": 2, "incremental_epochs": 1, "learning_rate": 1e-3, "save_steps": 100}


def _card(state: Path, version: str) -> dict:
    return json.loads((state / "versions" / version / "card.json").read_text())


def test_v2_continues_v1_and_geometry_change_needs_fresh(tmp_path: Path, base_cache: Path):
    import shutil

    state = tmp_path / "state"
    shutil.copytree(base_cache, state / "base")
    config = write_tiny_config(tmp_path, TRAIN)
    a = add_batch(state, "A", n=4, seed=0)
    assert train_now(config) == 0
    b = add_batch(state, "B", n=4, seed=2)
    assert train_now(config) == 0

    v1, v2 = _card(state, "v0001"), _card(state, "v0002")
    assert v1["parent"] is None and v1["learning_rate"] == pytest.approx(1e-3)
    assert v2["parent"] == "v0001"
    assert v2["learning_rate"] == pytest.approx(0.4 * 1e-3)
    assert v2["epochs"] <= 1
    assert v2["new_batches"] == [b] and a in v2["batches"]  # rehearsal of A
    assert v2["start_step"] == v1["step"] and v2["step"] == v1["step"] + v2["steps"]

    with Journal.for_state(state) as journal:
        assert queries.head_version(journal) == "v0002"
        # v2's run starts from exactly v1's final weights
        run = find_run(journal, "r0002")
        ctx = RunContext(config, journal, run)
        start = ctx.trainer.adapter_state()
        v1_final = load_file(state / "versions/v0001/adapter/adapter_model.safetensors")
        v1_final = {k.removeprefix("base_model.model."): v for k, v in v1_final.items()}
        assert start.keys() == v1_final.keys()
        assert all(torch.equal(start[k], v1_final[k]) for k in start)

        # a new batch with rank 8 -> 4: refused, naming the key and the way out
        add_batch(state, "C", n=2, seed=3)
        rank4 = write_tiny_config(tmp_path, TRAIN, lora={"rank": 4, "alpha": 4})
        with pytest.raises(UsageError, match=r"lora\.rank is 4 but head v0002 .*--fresh"):
            plan_run(journal, rank4)
        assert journal.query("SELECT count(*) AS n FROM runs")[0]["n"] == 2

    assert train_now(rank4, fresh=True) == 0
    v3 = _card(state, "v0003")
    assert v3["parent"] is None and v3["start_step"] == 0 and v3["lora"]["rank"] == 4
    assert len(v3["new_batches"]) == 3  # a new lineage learns every batch the old one knew
    assert v3["learning_rate"] == pytest.approx(1e-3)


def test_nothing_new_to_train(tmp_path: Path, base_cache: Path):
    import shutil

    state = tmp_path / "state"
    shutil.copytree(base_cache, state / "base")
    config = write_tiny_config(tmp_path, TRAIN)
    assert train_now(config) == 0  # nothing to train: no batch at all
    with Journal.for_state(state) as journal:
        assert journal.query("SELECT count(*) AS n FROM runs")[0]["n"] == 0
        assert journal.query("SELECT count(*) AS n FROM base_models")[0]["n"] == 1


def test_version_worse_on_known_batches_is_held(tmp_path: Path, base_cache: Path):
    import shutil

    state = tmp_path / "state"
    shutil.copytree(base_cache, state / "base")
    # v1 learns batch A well; v2 then trains only on B with a learning rate far too high
    settings = {**TRAIN, "validation_split": 0.25, "rehearsal_ratio": 0, "epochs": 30,
                "learning_rate": 1e-2, "promote_tolerance": 0.01}
    config = write_tiny_config(tmp_path, settings)
    add_batch(state, "A", n=4, seed=0)
    assert train_now(config) == 0
    add_batch(state, "B", n=4, seed=2)
    wild = write_tiny_config(tmp_path, {**settings, "learning_rate": 1.0, "max_grad_norm": 1e6,
                                        "incremental_epochs": 30, "incremental_lr_factor": 1.0})
    assert train_now(wild) == 0
    with Journal.for_state(state) as journal:
        held = [e.payload for e in journal.events(types=("VersionHeld",))]
        assert queries.head_version(journal) == "v0001"
        row = queries.version(journal, "v0002")
    assert len(held) == 1 and held[0]["version"] == "v0002"
    assert held[0]["val_loss_known"] > held[0]["parent_val_loss_known"] * 1.05
    assert row["held"] == 1 and "held" in row["held_reason"]


def test_text_encoder_lora_trains_and_is_published(tmp_path: Path, base_cache: Path):
    import shutil

    state = tmp_path / "state"
    shutil.copytree(base_cache, state / "base")
    config = write_tiny_config(tmp_path, {"epochs": 1}, lora={"train_text_encoder": True})
    add_batch(state, "A", n=2, seed=0)
    assert train_now(config) == 0
    te = load_file(state / "versions/v0001/adapter/text_encoder/adapter_model.safetensors")
    assert any("q_proj.lora_B" in k for k in te)
    assert any(v.abs().sum() > 0 for k, v in te.items() if "lora_B" in k)  # it trained
