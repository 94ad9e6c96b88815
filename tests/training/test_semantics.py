"""Training that means what the config says (issue 13, items 6-9 and 13): the gate's two losses
are measured the same way, epochs are epochs under gradient accumulation, warmup fits every
run, fp16 without a GPU is refused and its grad scaler survives a checkpoint, and the docs list
what a checkpoint holds."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_service.config import Train
from lora_service.daemon.foreground import train_now
from lora_service.daemon.plan import plan_run
from lora_service.journal import Journal
from lora_service.models.base_model import materialise, register
from lora_service.training import checkpoint
from lora_service.training.run import RunContext, find_run

from .conftest import ROOT, add_batch, run_child, write_tiny_config


def _state(tmp_path: Path, base_cache: Path) -> Path:
    state = tmp_path / "state"
    shutil.copytree(base_cache, state / "base")
    return state


def _planned(state: Path, config) -> str:
    """Register the base, plan the next run and journal it; return its run id."""
    with Journal.for_state(state) as journal:
        register(journal, materialise(config.base_model, state))
        run = plan_run(journal, config)
        assert run is not None
        journal.append(run)
        return run.run_id


def _card(state: Path, version: str) -> dict:
    return json.loads((state / "versions" / version / "card.json").read_text())


def _events(state: Path, kind: str) -> list[dict]:
    with Journal.for_state(state) as journal:
        return [e.payload for e in journal.events(types=(kind,))]


# -- item 6 ----------------------------------------------------------------------------------


def test_an_unchanged_child_measures_exactly_its_parents_loss_under_bf16(tmp_path, base_cache):
    """bf16 autocasts on the CPU too: a parent measured outside it and a child inside it differ
    though their weights are the same. A learning rate of 1e-12 with gradients clipped to 1e-30
    leaves v2's weights bit-identical to v1's, so the gate must see equal losses."""
    state = _state(tmp_path, base_cache)
    settings = {"mixed_precision": "bf16", "validation_split": 0.25, "rehearsal_ratio": 0,
                "epochs": 1, "incremental_epochs": 1, "save_steps": 100}
    add_batch(state, "A", n=4, seed=0)
    assert train_now(write_tiny_config(tmp_path, settings)) == 0
    add_batch(state, "B", n=4, seed=2)
    still = write_tiny_config(tmp_path, {**settings, "learning_rate": 1e-12,
                                         "max_grad_norm": 1e-30})
    assert train_now(still) == 0

    adapter = "adapter/adapter_model.safetensors"
    v1 = load_file(state / "versions/v0001" / adapter)
    v2 = load_file(state / "versions/v0002" / adapter)
    assert v1.keys() == v2.keys() and all(torch.equal(v1[k], v2[k]) for k in v1)
    card = _card(state, "v0002")
    assert card["parent"] == "v0001" and card["val_loss_known"] is not None
    assert card["val_loss_known"] == card["parent_val_loss_known"]
    for batch, loss in card.get("parent_val_loss_per_batch", {}).items():
        assert card["val_loss_per_batch"][batch] == loss


# -- item 7 ----------------------------------------------------------------------------------


def test_gradient_accumulation_trains_the_epochs_it_says(tmp_path, base_cache):
    """8 images, batch 4, accumulation 4, 2 epochs: 2 micro-batches an epoch, so one optimizer
    step an epoch with a short window, each image seen once an epoch (was: 4 epochs)."""
    state = _state(tmp_path, base_cache)
    config = write_tiny_config(tmp_path, {"batch_size": 4, "gradient_accumulation_steps": 4,
                                          "epochs": 2, "save_steps": 100})
    add_batch(state, "A", n=8, seed=0)
    run_id = _planned(state, config)
    with Journal.for_state(state) as journal:
        run = find_run(journal, run_id)
        assert run.total_steps == 2 and run.epochs == 2
        ctx = RunContext(config, journal, run)
        tr = ctx.trainer
        tr.prepare()
        steps = list(tr.steps())
        assert [s.images for s in steps] == [8, 8]  # was [16, 16]: 4 passes over 8 images
        for local in range(run.total_steps):
            epoch, window = tr.window(local)
            seen = [i for pos in window for i in tr.micro_batch(epoch, pos)]
            assert epoch == local and sorted(seen) == list(range(8))
        state_json = ctx.trainer_state()
        assert (state_json["epoch"], state_json["position"]) == (2, 0)


def test_a_run_cut_short_by_max_steps_says_how_many_epochs_it_trained(tmp_path, base_cache):
    """8 images, batch 4: 2 steps an epoch; 2 epochs capped at 1 step end inside the first
    epoch: ss_epoch (kohya's: the epoch it was in) and the card say 1, not the planned 2."""
    state = _state(tmp_path, base_cache)
    config = write_tiny_config(tmp_path, {"batch_size": 4, "epochs": 2, "max_steps": 1,
                                          "save_steps": 100})
    add_batch(state, "A", n=8, seed=0)
    run_child(config, _planned(state, config))
    kohya = next((state / "versions" / "v0001").glob("*.safetensors"))
    with safe_open(str(kohya), framework="pt") as f:
        metadata = f.metadata()
    assert int(metadata["ss_epoch"]) == 1
    assert _card(state, "v0001")["epochs"] == 1


# -- item 8 ----------------------------------------------------------------------------------


def test_warmup_is_a_share_of_each_run():
    def Warm(**warmup: float) -> Train:  # noqa: N802
        return Train(lr_scheduler="linear", **warmup)

    assert Warm(warmup_ratio=0.1).warmup_for(30, 500) == 3
    assert Warm(warmup_ratio=0.1).warmup_for(8, 8) == 1
    assert Warm(warmup_ratio=0.5).warmup_for(1, 1) == 1
    # warmup_steps: as given for a lineage's first run (never past its end), its share after
    assert Warm(warmup_steps=50).warmup_for(500, 500) == 50
    assert Warm(warmup_steps=50).warmup_for(30, 500) == 3
    assert Warm(warmup_steps=50).warmup_for(40, 40) == 40
    assert Warm().warmup_for(30, 500) == 0
    with pytest.raises(ValueError, match="set warmup_steps or warmup_ratio"):
        Warm(warmup_steps=10, warmup_ratio=0.1)
    # diffusers' `constant` schedule ignores a warmup: asking for one there is refused
    for warmup in ({"warmup_steps": 10}, {"warmup_ratio": 0.1}):
        with pytest.raises(ValueError, match="`constant` has no warmup"):
            Train(**warmup)


def test_an_increment_reaches_its_learning_rate(tmp_path, base_cache):
    """warmup_steps 10 over a first run of 20 steps; an increment of 8 steps warms up over the
    same share (4 steps) instead of stopping at 8/10 of its rate. Every LossLogged lr is
    diffusers' constant_with_warmup value: rate x min(1, k / warmup) after k steps."""
    state = _state(tmp_path, base_cache)
    config = write_tiny_config(tmp_path, {
        "batch_size": 1, "epochs": 5, "incremental_epochs": 4, "rehearsal_ratio": 0,
        "lr_scheduler": "constant_with_warmup", "warmup_steps": 10, "learning_rate": 1e-3,
        "save_steps": 100})
    add_batch(state, "A", n=4, seed=0)
    assert train_now(config) == 0
    add_batch(state, "B", n=2, seed=2)
    assert train_now(config) == 0

    logged = _events(state, "LossLogged")
    for run_id, start, steps, warmup, rate in (("r0001", 0, 20, 10, 1e-3),
                                               ("r0002", 20, 8, 4, 0.4e-3)):
        got = [(e["step"], e["lr"]) for e in logged if e["run_id"] == run_id]
        ends = [s for s in range(start + 1, start + steps + 1) if s % 5 == 0 or s == start + steps]
        assert [s for s, _ in got] == ends
        for step, lr in got:
            assert lr == pytest.approx(rate * min(1.0, (step - start) / warmup), rel=1e-6), step
    assert got[-1][1] == pytest.approx(0.4e-3)  # the increment ends at its learning rate


# -- item 9 ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_without_a_gpu_is_refused_in_one_line(tmp_path, base_cache):
    state = _state(tmp_path, base_cache)
    config = write_tiny_config(tmp_path, {"mixed_precision": "fp16"})
    add_batch(state, "A", n=2, seed=0)
    proc = run_child(config, _planned(state, config), wait=False)
    assert isinstance(proc, subprocess.Popen)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err.decode()[-2000:]
    reason = _events(state, "RunFailed")[0]["reason"]
    assert reason.startswith("train.mixed_precision: fp16 needs a CUDA GPU")
    assert "bf16 or no" in reason and "\n" not in reason
    assert "Traceback" not in err.decode() and not (state / "versions").exists()


def test_a_checkpoint_keeps_the_fp16_grad_scaler_state(tmp_path):
    """On a GPU accelerate's fp16 GradScaler adapts its loss scale as training goes; a resumed
    run must continue from that scale. A CPU GradScaler has the same state dict."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
    scaler.scale(torch.ones(1))  # materialise the scale tensors, as a first step does
    saved = scaler.state_dict()
    common = {"adapter": {"w": torch.ones(2)}, "optimizer": {"state": {}, "param_groups": []},
              "scheduler": {"last_epoch": 3}, "trainer_state": {"run_id": "r0001"}}
    checkpoint.save(tmp_path, "r0001", 3, grad_scaler=saved, **common)
    checkpoint.save(tmp_path, "r0001", 4, **common)  # no fp16: no scaler file
    newest, skipped = checkpoint.latest_valid(tmp_path, "r0001")
    assert newest is not None and newest.step == 4 and not skipped
    assert newest.grad_scaler() is None
    older = checkpoint.all_checkpoints(tmp_path, "r0001")[1]
    assert checkpoint.verify(older.path) is None
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(older.grad_scaler())
    assert restored.state_dict() == saved and restored.get_scale() == 2.0**10
    (older.path / checkpoint.GRAD_SCALER).write_text("{}")
    assert "does not match" in (checkpoint.verify(older.path) or "")


# -- item 13 ---------------------------------------------------------------------------------


def test_how_it_works_lists_what_a_checkpoint_holds(tmp_path):
    checkpoint.save(tmp_path, "r0001", 1, adapter={"w": torch.ones(1)}, optimizer={},
                    scheduler={}, trainer_state={})
    folder = checkpoint.all_checkpoints(tmp_path, "r0001")[0].path
    doc = (ROOT / "docs" / "how-it-works.md").read_text()
    for name in [*sorted(p.name for p in folder.iterdir()), "grad_scaler.json"]:  # + fp16's
        assert f"`{name}`" in doc, name
    assert "every RNG state" not in doc
