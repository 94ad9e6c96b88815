"""Exact resume: a run killed (SIGKILL, or mid-checkpoint write) and resumed ends with the same
adapter, tensor by tensor, as a run that was never interrupted."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lora_service.daemon.plan import plan_run
from lora_service.journal import Journal
from lora_service.models.base_model import materialise, register
from lora_service.training import checkpoint

from .conftest import add_batch, run_child, write_tiny_config

SETTINGS = {"epochs": 4, "save_steps": 2, "keep_checkpoints": 2}  # 8 steps


def _final_adapter(state: Path, version: str = "v0001") -> dict[str, torch.Tensor]:
    return load_file(state / "versions" / version / "adapter" / "adapter_model.safetensors")


def _events(state: Path, *types: str) -> list[dict]:
    with Journal.for_state(state) as journal:
        return [e.payload for e in journal.events(types=types)]


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _wait_checkpoints(proc: subprocess.Popen, state: Path, n: int) -> None:
    deadline = time.monotonic() + 120
    while len(_events(state, "CheckpointSaved")) < n:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _kill_after_two_checkpoints(state: Path, config: Any, run_id: str) -> None:
    """Start the training child slowed down, SIGKILL it once two checkpoints are journaled."""
    proc = run_child(config, run_id, "step-delay=0.3", wait=False)
    _wait_checkpoints(proc, state, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_cache) -> dict[str, torch.Tensor]:
    """An uninterrupted run (in its own state folder; same batches, same plan)."""
    state, config, run = _fresh_state(tmp_path_factory, base_cache)
    run_child(config, run.run_id)
    return _final_adapter(state)


def test_sigkill_after_second_checkpoint_resumes_bit_identically(
    reference, tmp_path_factory, base_cache
):
    state, config, run = _fresh_state(tmp_path_factory, base_cache)
    _kill_after_two_checkpoints(state, config, run.run_id)
    assert not (state / "versions").exists()
    run_child(config, run.run_id)

    resumed = _events(state, "RunResumed")
    assert len(resumed) == 1 and resumed[0]["checkpoint"].endswith("step-000004")
    _assert_identical(_final_adapter(state), reference)
    steps = [e["step"] for e in _events(state, "CheckpointSaved")]
    assert steps[-1] == 8 and steps == sorted(steps)
    # only the newest keep_checkpoints folders remain, and the journal released the others
    left = sorted(p.name for p in checkpoint.checkpoints_dir(state, run.run_id).iterdir())
    assert left == ["step-000006", "step-000008"]
    released = [f for e in _events(state, "CheckpointSaved") for f in e["released"]]
    assert any("step-000002/" in f for f in released)


def test_kill_mid_checkpoint_write_ignores_half_written(
    reference, tmp_path_factory, base_cache
):
    state, config, run = _fresh_state(tmp_path_factory, base_cache)
    proc = run_child(config, run.run_id, "crash-in-checkpoint=4", wait=False)
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    root = checkpoint.checkpoints_dir(state, run.run_id)
    assert [p.name for p in root.glob("step-*")] == ["step-000002"]
    assert list(root.glob(".step-000004.tmp-*")), "the crash left a half-written folder"

    run_child(config, run.run_id)
    resumed = _events(state, "RunResumed")
    assert resumed[0]["checkpoint"].endswith("step-000002")
    assert not list(root.glob(".step-*"))
    _assert_identical(_final_adapter(state), reference)


def test_damaged_newest_checkpoint_is_skipped(
    reference, tmp_path_factory, base_cache
):
    state, config, run = _fresh_state(tmp_path_factory, base_cache)
    _kill_after_two_checkpoints(state, config, run.run_id)
    newest = checkpoint.all_checkpoints(state, run.run_id)[0]
    data = (newest.path / "optimizer.pt").read_bytes()
    (newest.path / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert "optimizer.pt" in (checkpoint.verify(newest.path) or "")

    run_child(config, run.run_id)
    resumed = _events(state, "RunResumed")[0]
    assert not resumed["checkpoint"].endswith(newest.path.name)
    assert newest.path.name in resumed["reason"]
    _assert_identical(_final_adapter(state), reference)
    state_json = json.loads(
        (checkpoint.all_checkpoints(state, run.run_id)[0].path / "trainer_state.json").read_text()
    )
    assert state_json["step"] == 8 and state_json["threads"] == 1


def _fresh_state(tmp_path_factory, base_cache):
    """An independent state folder with the same batch and the same planned run."""
    root = tmp_path_factory.mktemp("run")
    state = root / "state"
    shutil.copytree(base_cache, state / "base")
    config = write_tiny_config(root, SETTINGS)
    add_batch(state, "A", n=4, seed=1)
    with Journal.for_state(state) as journal:
        base = materialise(config.base_model, state)
        register(journal, base)
        run = plan_run(journal, config)
        assert run is not None and run.total_steps == 8
        journal.append(run)
    return state, config, run


def test_sigterm_saves_a_checkpoint_and_exits_0(reference, tmp_path_factory, base_cache):
    state, config, run = _fresh_state(tmp_path_factory, base_cache)
    proc = run_child(config, run.run_id, "step-delay=0.3", wait=False)
    _wait_checkpoints(proc, state, 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert json.loads(out.decode().strip().splitlines()[-1])["status"] == "stopped"
    stopped_at = _events(state, "CheckpointSaved")[-1]["step"]
    assert 2 <= stopped_at < 8 and not (state / "versions").exists()

    run_child(config, run.run_id)
    assert _events(state, "RunResumed")[0]["from_step"] == stopped_at
    _assert_identical(_final_adapter(state), reference)


def test_failure_is_journaled_and_exits_1(tmp_path_factory, base_cache):
    state, config, run = _fresh_state(tmp_path_factory, base_cache)
    for image in (state / "batches").glob("*/img0.png"):
        image.unlink()
    proc = run_child(config, run.run_id, wait=False)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    failed = _events(state, "RunFailed")
    assert len(failed) == 1 and "img0.png" in failed[0]["reason"]
    assert "Traceback" not in err.decode()  # an expected failure: one line, no traceback
