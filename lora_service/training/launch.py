"""`accelerate launch`, started by the daemon when `train.num_processes` > 1.

The same launcher as `python -m accelerate.commands.launch`, with the training child's guard
first: it asks the kernel to SIGKILL it when the daemon dies, and its workers (training
children) die with it in turn, so a SIGKILLed daemon leaves no run training behind it.
"""

from __future__ import annotations

import os

from lora_service.process import PARENT_ENV, die_with_parent

if __name__ == "__main__":
    die_with_parent()
    os.environ[PARENT_ENV] = str(os.getpid())  # the workers' parent, which they check
    from accelerate.commands.launch import main

    main()
