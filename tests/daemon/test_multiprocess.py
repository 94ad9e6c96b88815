"""`train.num_processes: 2` under the daemon: two real training processes (CPU, gloo) started
through `accelerate launch`, killed, stopped and resumed like a single one."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from lora_service.daemon.child import _children
from lora_service.journal import Journal
from lora_service.journal.verify import verify

from .test_daemon_e2e import TIMEOUT, alive, drop_batch, events, start, stop, wait_for

TWO = {"train": {"num_processes": 2, "batch_size": 4, "epochs": 30, "save_steps": 2,
                 "lr_scheduler": "linear"},
       "schedule": {"on_arrival": True}}


def workers(launcher: int, count: int = 2) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = _children(launcher)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"launcher {launcher} has {_children(launcher)} as children")


def test_two_processes_survive_kill_and_stop_and_make_one_version(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config(TWO)
    state, inbox = tmp_path / "state", tmp_path / "inbox"

    # 1. SIGKILL the daemon: the launcher and both workers die with it
    daemon = start(config, "step-delay=0.3")
    drop_batch(inbox, "two", n=8, seed=6)
    try:
        wait_for(state, "CheckpointSaved", daemon=daemon)
        launcher = json.loads((state / "daemon.json").read_text())["child"]["pid"]
        pids = [launcher, *workers(launcher)]
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=TIMEOUT)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "a training process outlived its SIGKILLed daemon"
    assert not events(state, "RunResumed"), "a fresh run is not a restart, on any process"

    # 2. SIGTERM one worker only: both agree on its step, checkpoint and exit 0; the daemon
    # sees a clean stop of a run still running and resumes it from that checkpoint
    daemon = start(config, "step-delay=0.3")
    try:
        resumed = wait_for(state, "RunResumed", daemon=daemon)[0]
        assert resumed["checkpoint"] is not None
        launcher = json.loads((state / "daemon.json").read_text())["child"]["pid"]
        os.kill(workers(launcher)[-1], signal.SIGTERM)
        again = wait_for(state, "RunResumed", 2, daemon=daemon)[-1]
        assert again["from_step"] == events(state, "CheckpointSaved")[-1]["step"] > 0
        assert not events(state, "RunFailed"), "a stop is not a failure"

        # 3. SIGTERM the daemon: it stops the workers, which checkpoint and exit 0
        wait_for(state, "CheckpointSaved", len(events(state, "CheckpointSaved")) + 1,
                 daemon=daemon)
    finally:
        assert stop(daemon) == 0
    assert not events(state, "RunFailed"), "a requested stop is not a failure"
    assert events(state)[-1]["type"] == "ServiceStopped"
    stopped_at = events(state, "CheckpointSaved")[-1]["step"]

    # 4. restart: resumes from that checkpoint and publishes exactly one version
    daemon = start(config)
    try:
        assert wait_for(state, "RunResumed", 3, daemon=daemon)[-1]["from_step"] == stopped_at
        wait_for(state, "VersionCreated", daemon=daemon)
    finally:
        assert stop(daemon) == 0
    assert len(events(state, "VersionCreated")) == 1
    steps = [e["step"] for e in events(state, "CheckpointSaved")]
    assert len(steps) == len(set(steps)), f"one process writes checkpoints, got {steps}"
    logged = [e["step"] for e in events(state, "LossLogged")]
    assert len(logged) == len(set(logged)), f"one process logs losses, got {logged}"
    assert not events(state, "RunFailed")
    # one LR schedule over the run's steps, across processes and three resumes
    run = events(state, "RunStarted")[0]
    total, lr = run["total_steps"], run["learning_rate"]
    for e in events(state, "LossLogged"):
        assert abs(e["lr"] - lr * (total - e["step"]) / total) <= 1e-12, e
    with Journal.for_state(state) as journal:
        assert verify(journal, state).ok, verify(journal, state).problems
