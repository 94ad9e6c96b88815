"""What the training child reports about its own run: where the time went (`run timings` in the
log), every loss point journaled although they are committed together and read from the
device only when logged, and checkpoints written in the background yet journaled in order,
each before the version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_service.daemon.plan import plan_run
from lora_service.journal import Journal
from lora_service.models.base_model import materialise, register
from lora_service.training import checkpoint, timing
from lora_service.training.run import LOSS_EVERY

from .conftest import add_batch, run_child, write_tiny_config


def test_a_run_logs_its_time_breakdown_every_loss_point_and_its_checkpoints_in_order(
    tmp_path: Path, base_cache: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(base_cache, state / "base")
    # 4 images, batch 2, 6 epochs: 12 steps; a checkpoint every 5 (5, 10 and the last, 12)
    config = write_tiny_config(tmp_path, {"epochs": 6, "save_steps": 5, "keep_checkpoints": 5})
    add_batch(state, "A", n=4, seed=3)
    with Journal.for_state(state) as journal:
        register(journal, materialise(config.base_model, state))
        run = plan_run(journal, config)
        assert run is not None and run.total_steps == 12
        journal.append(run)
    run_child(config, run.run_id, "slow-checkpoint=0.5")  # the next steps outrun each write

    with Journal.for_state(state, mode="read") as journal:
        stored = [(e.type, e.payload) for e in journal.events(
            types=("LossLogged", "CheckpointSaved", "VersionCreated"))]
    logged = {p["step"]: p["loss"] for t, p in stored if t == "LossLogged"}
    assert sorted(logged) == [5, 10, 12]
    saved = [p["step"] for t, p in stored if t == "CheckpointSaved"]
    assert saved == [5, 10, 12]
    assert [t for t, _ in stored][-1] == "VersionCreated"
    # a checkpoint is journaled before the loss points of later steps (`status` never goes back)
    for i, (type_, payload) in enumerate(stored):
        if type_ == "CheckpointSaved":
            assert all(p["step"] <= payload["step"] for t, p in stored[:i] if t == "LossLogged")
    # each checkpoint holds the losses of its own steps, none of later ones (they are written
    # by a thread while the next steps run)
    for ckpt in checkpoint.all_checkpoints(state, run.run_id):
        assert len(ckpt.state()["losses"]) == ckpt.step
    # every point the journal shows is the loss the run recorded for that step
    last = checkpoint.latest_valid(state, run.run_id)[0]
    assert last is not None and last.step == 12
    losses = last.state()["losses"]
    assert len(losses) == 12
    assert {step: losses[step - 1] for step in logged} == logged
    # the checkpoint written in the background holds the weights of its step: the final one's
    # adapter is the version's (the run ended there)
    version = load_file(state / "versions" / "v0001" / "adapter" / "adapter_model.safetensors")
    final = {f"base_model.model.{key}": value for key, value in last.adapter().items()}
    assert version.keys() == final.keys() and version
    assert all(torch.equal(version[key], final[key]) for key in version)
    assert LOSS_EVERY == 5

    log = state / "logs" / "train.log"
    lines = [json.loads(line) for line in log.read_text().splitlines() if '"run timings"' in line]
    assert [line["run_id"] for line in lines] == [run.run_id]
    seconds = lines[0]["seconds"]
    assert timing.logged(log, run.run_id) == seconds
    assert set(seconds) == {*timing.PHASES, "other", "total"}
    assert all(value >= 0 for value in seconds.values())
    assert seconds["start-up"] > 0.5  # the interpreter and torch's imports, from process start
    assert seconds["step"] > 0 and seconds["checkpoints"] > 0 and seconds["publishing"] > 0
    assert seconds["parent validation"] == 0  # a first run has no parent
    phases = sum(seconds[name] for name in timing.PHASES)
    assert abs(phases + seconds["other"] - seconds["total"]) < 0.01
    assert seconds["other"] < 0.25 * seconds["total"]
