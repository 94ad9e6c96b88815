"""Child process for the crash tests: scan the inbox in a loop until killed (or once).

Usage: _intake_child.py CONFIG [once] [--crash-at POINT] [--user UID]; with --crash-at the
child SIGKILLs itself at that point of the intake flow (see `Hooks`); with --user a child
started as root becomes that user before it opens anything (for permission tests: the
interpreter itself may live where that user cannot read, so it cannot be started as them)."""

from __future__ import annotations

import os
import pwd
import signal
import sys
import time

from PIL import Image

from lora_service.config import load_config
from lora_service.inbox.intake import Hooks, Intake
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
    if "--user" in args:
        user = pwd.getpwuid(int(args[args.index("--user") + 1]))
        Image.init()  # Pillow's format plugins are imported lazily: import them while we can
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
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
