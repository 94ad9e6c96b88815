"""Child process for the crash tests: scan the inbox in a loop until killed (or once)."""

from __future__ import annotations

import sys
import time

from lora_service.config import load_config
from lora_service.inbox import Intake
from lora_service.journal import Journal


def main() -> None:
    config = load_config(sys.argv[1])
    once = len(sys.argv) > 2 and sys.argv[2] == "once"
    journal = Journal.for_state(config.paths.state)
    intake = Intake(journal, config)
    print("up", flush=True)
    while True:
        intake.scan()
        if once:
            return
        time.sleep(0.005)


if __name__ == "__main__":
    main()
