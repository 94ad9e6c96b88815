"""A training child that hangs is noticed: no heartbeat for train.stall_timeout, it is stopped
(SIGTERM, then SIGKILL), journaled `RunFailed` with reason `stalled`, and retried to a version.

The retry runs under the same 3 s stall_timeout, through model loading, latent caching and
publishing, each longer than that here: long legitimate phases are not taken for a hang.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from lora_service.journal import Journal
from lora_service.journal.verify import verify
from lora_service.training import heartbeat

from .test_daemon_e2e import FAST, drop_batch, events, stop, wait_for

DAEMON = Path(__file__).with_name("_daemon.py")
STALL_S = 3


def start_daemon(config: Path, log: Path, child_args: list[list[str]]) -> subprocess.Popen[str]:
    """A real daemon process whose first training children get `child_args`."""
    return subprocess.Popen([sys.executable, str(DAEMON), str(config), json.dumps(child_args)],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)


def test_a_hung_child_is_stopped_journaled_stalled_and_retried(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config({**FAST, "train": {**FAST["train"], "stall_timeout": f"{STALL_S}s"}})
    state = tmp_path / "state"
    daemon = start_daemon(config, tmp_path / "daemon.log", [["--fault", "hang-at-step=3"]])
    try:
        drop_batch(tmp_path / "inbox", "hang", seed=6)
        failed = wait_for(state, "RunFailed", daemon=daemon)[0]
        version = wait_for(state, "VersionCreated", daemon=daemon)[0]
    finally:
        assert stop(daemon) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    assert failed["reason"].startswith("stalled: no progress for"), failed["reason"]
    assert failed["signal"] == "SIGKILL"  # deaf to SIGTERM, as a deadlocked child is
    assert failed["attempt"] == 1 and not failed["gave_up"]
    # noticed within stall_timeout + the SIGTERM grace (+ ticks) after the last step's beat;
    # that beat can precede the step's checkpoint (journaled by a thread once written) by up to
    # heartbeat.EVERY_S, since beats are at most one a second
    last_step = max(e["seq"] for e in events(state, "CheckpointSaved")
                    if e["seq"] < failed["seq"])
    ts = {e["seq"]: datetime.fromisoformat(e["ts"]) for e in all_events(state)}
    took = (ts[failed["seq"]] - ts[last_step]).total_seconds()
    assert 2 * STALL_S - heartbeat.EVERY_S <= took <= 2 * STALL_S + 6, took
    assert version["run_id"] == failed["run_id"]
    resumed = [e for e in events(state, "RunResumed") if e["seq"] > failed["seq"]]
    assert resumed and resumed[0]["from_step"] == 2  # the checkpoint before the hang
    assert len(events(state, "RunFailed")) == 1  # the retry's long phases never tripped it
    with Journal.for_state(state) as journal:
        assert verify(journal, state).ok


def all_events(state: Path) -> list[dict[str, str | int]]:
    with Journal.for_state(state) as journal:
        return [{"seq": e.seq, "ts": e.ts} for e in journal.events()]
