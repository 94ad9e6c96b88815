"""The daemon end to end, through real processes: inbox drops, versions, kills, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from safetensors.torch import load_file

from lora_service.journal import Journal
from lora_service.journal.verify import verify

TIMEOUT = 240
FAST = {"train": {"epochs": 2, "save_steps": 2}, "schedule": {"on_arrival": True}}


def drop_batch(inbox: Path, name: str, n: int = 4, seed: int = 0) -> None:
    """A captioned batch copied into the inbox, marked READY."""
    folder = inbox / name
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (32, 32), ((seed * 60 + i * 50) % 256, (i * 80) % 256, 90))
        for x in range(0, 32, 3):
            img.putpixel((x, (x * (i + 1) + seed) % 32), (250, 250, 250))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a pattern {name} number {i}")
    (folder / "READY").touch()


DAEMON = Path(__file__).with_name("_daemon.py")


def start(config: Path, *faults: str, **env: str) -> subprocess.Popen[str]:
    """`lora-service run`; with `faults` (`--fault` specs of training/faults.py), a daemon
    whose training children get them, set through the Supervisor's `child_args` seam."""
    argv = [sys.executable, "-m", "lora_service", "run", "--config", str(config)]
    if faults:
        child_args = [[arg for f in faults for arg in ("--fault", f)]] * 20  # every child
        argv = [sys.executable, str(DAEMON), str(config), json.dumps(child_args)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def events(state: Path, *types: str) -> list[dict[str, Any]]:
    if not (state / "journal.sqlite").exists():
        return []
    with Journal.for_state(state) as journal:
        return [{"seq": e.seq, "type": e.type, **e.payload} for e in journal.events(types=types)]


def wait_for(state: Path, type_: str, count: int = 1, daemon: subprocess.Popen | None = None,
             timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = events(state, type_)
        if len(found) >= count:
            return found
        if daemon is not None and daemon.poll() is not None:
            raise AssertionError(f"daemon exited {daemon.returncode}: {daemon.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} {type_} within {timeout}s: "
                         f"{[e['type'] for e in events(state)]}")


def stop(daemon: subprocess.Popen[str]) -> int:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    return daemon.wait(timeout=TIMEOUT)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def adapter(state: Path, version: str) -> dict[str, Any]:
    return load_file(state / "versions" / version / "adapter" / "adapter_model.safetensors")


def test_drop_two_batches_get_two_versions(write_config: Callable[..., Path],
                                           tmp_path: Path) -> None:
    config = write_config(FAST)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    daemon = start(config)
    try:
        drop_batch(inbox, "first", seed=1)
        first = wait_for(state, "VersionCreated", daemon=daemon)[0]
        assert first["version"] == "v0001" and first["parent"] is None
        drop_batch(inbox, "second", seed=2)
        second = wait_for(state, "VersionCreated", 2, daemon=daemon)[1]
        assert second["version"] == "v0002" and second["parent"] == "v0001"
        assert second["step"] > first["step"]
        status = subprocess.run(
            [sys.executable, "-m", "lora_service", "status", "--json", "--config", str(config)],
            capture_output=True, text=True, timeout=60)
        info = json.loads(status.stdout)
        assert info["head"]["version"] == "v0002" and info["daemon"]["running"]
        assert info["pending"]["batches"] == []
    finally:
        assert stop(daemon) == 0
    requests = events(state, "TrainingRequested")
    assert [r["reason"] for r in requests] == ["arrival", "arrival"]
    assert events(state)[-1]["type"] == "ServiceStopped"
    with Journal.for_state(state) as journal:
        assert verify(journal, state).ok


def test_sigkill_daemon_mid_run_resumes_to_identical_weights(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    slow = {"train": {"epochs": 6, "save_steps": 3}, "schedule": {"on_arrival": True}}
    config = write_config(slow)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    daemon = start(config, "step-delay=0.3")
    drop_batch(inbox, "kill", seed=3)
    try:
        wait_for(state, "CheckpointSaved", 1, daemon=daemon)
        child_pid = json.loads((state / "daemon.json").read_text())["child"]["pid"]
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=TIMEOUT)
    deadline = time.monotonic() + 30
    while alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child_pid), "the training child outlived its SIGKILLed daemon"
    assert not events(state, "VersionCreated")

    daemon = start(config)
    try:
        resumed = wait_for(state, "RunResumed", daemon=daemon)[0]
        assert resumed["checkpoint"] is not None and resumed["from_step"] >= 3
        wait_for(state, "VersionCreated", daemon=daemon)
    finally:
        assert stop(daemon) == 0

    # the same batch, never interrupted, in an inbox and state folder of its own
    data = yaml.safe_load(config.read_text())
    data["paths"] = {"inbox": "../ref-inbox", "state": "../ref-state"}
    reference_config = tmp_path / "ref" / "config.yaml"
    reference_config.parent.mkdir()
    reference_config.write_text(yaml.safe_dump(data))
    reference = start(reference_config)
    drop_batch(tmp_path / "ref-inbox", "kill", seed=3)
    try:
        wait_for(tmp_path / "ref-state", "VersionCreated", daemon=reference)
    finally:
        assert stop(reference) == 0
    mine, theirs = adapter(state, "v0001"), adapter(tmp_path / "ref-state", "v0001")
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert (mine[key] == theirs[key]).all(), key


def test_child_crash_is_journaled_and_the_next_run_works(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config(FAST)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    daemon = start(config, "segv")
    try:
        drop_batch(inbox, "crash", seed=4)
        failed = wait_for(state, "RunFailed", daemon=daemon)[0]
        assert failed["signal"] == "SIGSEGV" and "SIGSEGV" in failed["reason"]
        status = subprocess.run(
            [sys.executable, "-m", "lora_service", "status", "--json", "--config", str(config)],
            capture_output=True, text=True, timeout=60)
        assert status.returncode == 0
        assert json.loads(status.stdout)["last_failure"]["run_id"] == failed["run_id"]
    finally:
        assert stop(daemon) == 0
    daemon = start(config)  # no fault: the failed run is retried and finishes
    try:
        version = wait_for(state, "VersionCreated", daemon=daemon)[0]
        assert version["run_id"] == failed["run_id"]
    finally:
        assert stop(daemon) == 0


def test_sigterm_checkpoints_and_train_now_is_picked_up(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    slow = {"train": {"epochs": 20, "save_steps": 1000}, "schedule": {"on_arrival": False}}
    config = write_config(slow)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    daemon = start(config, "step-delay=0.2")
    try:
        drop_batch(inbox, "term", seed=5)
        wait_for(state, "BatchAccepted", daemon=daemon)
        time.sleep(1.5)
        assert not events(state, "RunStarted"), "on_arrival is off: nothing starts by itself"
        asked = subprocess.run(
            [sys.executable, "-m", "lora_service", "train-now", "--config", str(config)],
            capture_output=True, text=True, timeout=60)
        assert asked.returncode == 0 and "asked the running daemon" in asked.stdout
        wait_for(state, "RunStarted", daemon=daemon, timeout=10)
        wait_for(state, "LossLogged", daemon=daemon)
    finally:
        assert stop(daemon) == 0
    saved = events(state, "CheckpointSaved")
    assert saved, "SIGTERM must leave a checkpoint"
    assert events(state)[-1]["type"] == "ServiceStopped"
    with Journal.for_state(state) as journal:
        assert journal.query("SELECT status FROM runs")[0]["status"] == "running"

