"""A real daemon with the test seams set where its process starts, never in the environment.

`python tests/daemon/_daemon.py CONFIG SEAMS_JSON`: as `lora-service run --config CONFIG`, with
SEAMS_JSON either a list, the Supervisor's `child_args` (extra arguments for the first training
children, in order), or an object with `child_args` and `intake_delay` (seconds each batch
takes at least, through the intake's `Hooks`).
"""

from __future__ import annotations

import json
import sys
import time

from lora_service.config import load_config
from lora_service.daemon.supervisor import Supervisor
from lora_service.inbox.intake import Hooks


class SlowIntake(Hooks):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def at(self, point: str) -> None:
        if point == "reading":
            time.sleep(self.delay)


def main(config: str, seams_json: str) -> int:
    seams = json.loads(seams_json)
    if isinstance(seams, list):
        seams = {"child_args": seams}
    delay = seams.get("intake_delay")
    return Supervisor(load_config(config), child_args=seams.get("child_args", ()),
                      intake_hooks=SlowIntake(delay) if delay else None).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
