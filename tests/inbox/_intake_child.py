"""Child process for the crash tests: scan the inbox in a loop until killed (or once).

Usage: _intake_child.py CONFIG [once] [--crash-at POINT]; with --crash-at the child SIGKILLs
itself at that point of the intake flow (see `Hooks`)."""

from __future__ import annotations

import os
import signal
import sys
import time

from lora_service.config import load_config
from lora_service.inbox import Intake
from lora_service.inbox.intake import Hooks
from lora_service.journal import Journal


class CrashAt(Hooks):
    """SIGKILL at one named point: a power cut as far as intake can tell."""

    def __init__(self, point: str) -> None:
        self.point = point

    def at(self, point: str) -> None:
        if point == self.point:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    args = sys.argv[2:]
    config = load_config(sys.argv[1])
    hooks = CrashAt(args[args.index("--crash-at") + 1]) if "--crash-at" in args else None
    journal = Journal.for_state(config.paths.state)
    intake = Intake(journal, config, hooks=hooks)
    print("up", flush=True)
    while True:
        intake.scan()
        if "once" in args:
            return
        time.sleep(0.005)


if __name__ == "__main__":
    main()
