"""`lora-service train-now` without a daemon: plan, journal, run the child in the foreground.

The base model is materialised and registered by the torch child (`--register-base`), so the
plan can check the head's base sha256; training itself runs in a fresh child process, exactly
as under the daemon. Nothing here imports torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from lora_service.config import Config
from lora_service.daemon.child import ask_to_stop, child_argv, run_once
from lora_service.daemon.plan import plan_run
from lora_service.journal import Journal
from lora_service.journal.events import TrainingRequested
from lora_service.process import child_env
from lora_service.store import StateLock


def train_now(config: Config, fresh: bool = False) -> int:
    """Register the base model, plan a run, journal it, train it; return the child's exit code.

    Returns 0 with a message when there is nothing new to train. Holds the state lock, so it
    refuses (UsageError) while a daemon runs on the same state folder.
    """
    state = config.paths.state
    with StateLock(state):
        base_sha256 = run_once(config, f"base_model {config.base_model!r}", "--register-base")
        journal = Journal.for_state(state)
        request = TrainingRequested(fresh=fresh, reason="manual", pid=os.getpid())
        # plan against the journal as it is, then append request + run in one transaction
        run = plan_run(journal, config, fresh=fresh, request_seq=journal.last_seq() + 1,
                       base_sha256=base_sha256)
        if run is None:
            journal.append(request)
            print("nothing new to train: no pending batch with a training image",
                  file=sys.stderr)
            return 0
        journal.append(request, run)
        journal.close()
        print(f"run {run.run_id}: {len(run.batches)} new batch(es), {run.images} images, "
              f"{run.total_steps} steps from step {run.start_step}"
              + (f", parent {run.parent}" if run.parent else ", fresh adapter"),
              file=sys.stderr, flush=True)
        # the child runs in its own session; Ctrl-C here asks it to stop (it checkpoints and
        # exits 0) and this process waits for it instead of dying first
        proc = subprocess.Popen(child_argv(config, "--run", run.run_id), env=child_env(),
                                start_new_session=True)
        launcher = config.train.num_processes > 1
        previous = signal.signal(signal.SIGINT, lambda *_: ask_to_stop(proc, launcher))
        try:
            return proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
