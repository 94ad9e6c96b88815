"""Temporaries that killed processes left in the state folder are removed when the daemon
starts (holding the lock); everything else, and a temporary whose writer still lives, stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .test_service_lifecycle import TIMEOUT, start, wait_for_event


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_start_removes_what_killed_writers_left(write_config: Callable[..., Path],
                                                tmp_path: Path) -> None:
    state = tmp_path / "state"
    gone = dead_pid()
    leftovers = {  # the temporary -> a file in it (itself, when it is a file)
        state / ".daemon.json.k2j3h4g5.tmp": "",
        state / "versions" / f".v0002.tmp-{gone}": "adapter/adapter_model.safetensors",
        state / "base" / f".tiny-sd.tmp-{gone}": "unet/diffusion_pytorch_model.safetensors",
        state / "runs" / "r0001" / "checkpoints" / f".step-000004.tmp-{gone}": "optimizer.pt",
        state / "cache" / "8211ac36496fa505" / ".latent-ab-32.safetensors.x1y2z3w4.tmp": "",
    }
    kept = [
        state / "versions" / f".v0003.tmp-{os.getpid()}" / "card.json",  # its writer lives
        state / "runs" / "r0001" / "checkpoints" / "step-000002" / "optimizer.pt",
        state / "cache" / "8211ac36496fa505" / "latent-ab-32.safetensors",
        state / "notes.tmp",  # not a name we write
    ]
    for path in [*(p / inner for p, inner in leftovers.items()), *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"bytes of " + path.name.encode())
    daemon = start(write_config())
    try:
        wait_for_event(state, "ServiceStarted")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=TIMEOUT)
    assert daemon.returncode == 0, daemon.stderr.read() if daemon.stderr else ""
    assert [p for p in leftovers if os.path.lexists(p)] == []
    for path in kept:
        assert path.read_bytes() == b"bytes of " + path.name.encode(), path
    log = (state / "logs" / "train.log").read_text()
    assert log.count("removed what a killed process left") == len(leftovers)
