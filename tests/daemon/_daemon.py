"""A real daemon with the test seams set where its process starts, never in the environment.

`python tests/daemon/_daemon.py CONFIG CHILD_ARGS_JSON`: as `lora-service run --config CONFIG`,
with the Supervisor's `child_args` (extra arguments for the first training children, in order).
"""

from __future__ import annotations

import json
import sys

from lora_service.config import load_config
from lora_service.daemon.supervisor import Supervisor

if __name__ == "__main__":
    sys.exit(Supervisor(load_config(sys.argv[1]), child_args=json.loads(sys.argv[2])).run())
