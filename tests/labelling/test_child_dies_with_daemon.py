"""The labelling child dies with the process that started it (PR_SET_PDEATHSIG), as the
training child does: a SIGKILLed daemon leaves no labeller running, holding a model in memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# a daemon stand-in: the real ChildLabeller, its child told to hang (the `fault` seam)
PARENT = """
import sys
from pathlib import Path
from lora_service.config import load_config
from lora_service.inbox.labeller import ChildLabeller
ChildLabeller(load_config(sys.argv[1]), fault="hang")([Path(sys.argv[2])])
"""
TIMEOUT = 60


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_labelling_child_dies_with_its_sigkilled_parent(write_config: Callable[..., Path],
                                                            tmp_path: Path) -> None:
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"never loaded: the child hangs before")
    config = write_config({"labelling": {"enabled": True, "weights": str(weights)}})
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(config), str(tmp_path / "a.png")])
    try:
        wait(lambda: children(parent.pid) or parent.poll() is not None, "no labelling child")
        assert parent.poll() is None, "the parent exited"
        (child,) = children(parent.pid)
        assert b"lora_service.labelling" in Path(f"/proc/{child}/cmdline").read_bytes()
        # past die_with_parent once it sleeps in its hang (a kernel that hides wchan: 15 s)
        wchan = Path(f"/proc/{child}/wchan")
        deadline = time.monotonic() + 15
        while "nanosleep" not in wchan.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=TIMEOUT)
    wait(lambda: not alive(child), "the labelling child outlived its SIGKILLed parent")
