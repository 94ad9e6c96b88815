"""What a parent process and its children agree on, on both sides of the torch boundary.

The daemon, the CLI and the training and labelling children import this module: the children
ask the kernel to SIGKILL them when their parent dies (`die_with_parent`, PR_SET_PDEATHSIG), so
a SIGKILLed daemon leaves no orphan behind; `child_env` marks them as such children; a
training child says a failure is the disk's (not the run's) by its exit status and reason.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "LORA_SERVICE_PARENT_PID"
PR_SET_PDEATHSIG = 1
EX_TEMPFAIL = 75  # the child's exit status for a failure that is the disk's fault (sysexits.h)
DISK_PREFIX = "disk: "  # ...and its RunFailed reason's start: it does not count as an attempt


def die_with_parent() -> None:
    """In a child of the daemon (LORA_SERVICE_PARENT_PID set): ask Linux to SIGKILL this process
    when its parent dies, so a killed daemon leaves no orphaned child behind."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # the parent (the daemon, or the launcher that sets this for its workers) may have died
    # before prctl: then we were already re-parented
    if str(os.getppid()) != parent:
        os._exit(1)


def child_env() -> dict[str, str]:
    return {
        **os.environ,
        PARENT_ENV: str(os.getpid()),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
