"""Where one training child's time went, phase by phase, logged once as `run timings`.

A run's wall time is start-up (interpreter and imports, from the process's own start time),
base model, cache (encoding or reading latents), set-up (LoRA, accelerate, resume), the
parent's validation, the steps — split into `step` (forward, backward, optimizer), `host`
(the step's own Python: picking the batch, its generator, bookkeeping) and `between` (what
the loop does after a step: reading a logged loss, journal, heartbeat, TensorBoard) — `checkpoints`,
`validation`, `publishing` and `samples`. `bench/train.py` reads the line from the log file; an
operator reads it to see why a run was slow. Time spent in no phase is `other`.

On a GPU `step` ends when the host has queued the work (nothing here synchronises).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

PHASES = ("start-up", "base model", "cache", "set-up", "parent validation", "step", "host",
          "between", "checkpoints", "validation", "publishing", "samples")


def process_age() -> float:
    """Seconds since this process started (Linux: /proc; 0.0 elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/stat") as fh:
            # field 22 (starttime, in clock ticks since boot) after the parenthesised name
            started = int(fh.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as fh:
            return max(0.0, float(fh.read().split()[0]) - started)
    return 0.0


class Stopwatch:
    """Seconds per phase of this process's life, from its start."""

    def __init__(self) -> None:
        self.origin = time.perf_counter() - process_age()
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.seconds["start-up"] = time.perf_counter() - self.origin

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def report(self) -> dict[str, float]:
        """Each phase, `other` (the rest) and `total`, in seconds rounded to the millisecond."""
        total = time.perf_counter() - self.origin
        out = {name: round(secs, 3) for name, secs in self.seconds.items()}
        out["other"] = round(max(0.0, total - sum(self.seconds.values())), 3)
        out["total"] = round(total, 3)
        return out


def logged(log_file: Path, run_id: str) -> dict[str, float]:
    """The seconds of the last `run timings` line of `run_id` in a JSON log file ({} if none)."""
    found: dict[str, float] = {}
    with open(log_file, encoding="utf-8") as fh:
        for line in fh:
            if '"run timings"' in line:
                record = json.loads(line)
                if record.get("run_id") == run_id:
                    found = record["seconds"]
    return found
