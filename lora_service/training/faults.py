"""Faults a test injects into a training child, through its command line (`--fault SPEC`,
hidden), never through the environment: the seam is visible where the child is started.

- `step-delay=S`: sleep S seconds after every step (time for a test to kill or stop the run);
- `hang-at-step=N`: hang at step N, deaf to SIGTERM and without heartbeat (a stalled child);
- `crash-in-checkpoint=N`: SIGKILL half-way through writing step N's checkpoint (a power cut);
- `slow-checkpoint=S`: each checkpoint's writer sleeps S seconds first (a slow disk: the steps
  after a checkpoint run while it is still being written);
- `segv`: die by SIGSEGV before training (a crashing child).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Faults:
    step_delay: float = 0.0
    hang_at_step: int | None = None
    crash_in_checkpoint: int | None = None
    slow_checkpoint: float = 0.0
    segv: bool = False

    @classmethod
    def parse(cls, specs: Sequence[str]) -> Faults:
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, float | int | bool] = {}
        for spec in specs:
            name, _, value = spec.partition("=")
            key = name.replace("-", "_")
            if key not in types:
                raise ValueError(f"--fault {spec!r}: not one of {', '.join(types)}")
            kind = types[key]
            values[key] = (True if "bool" in kind else float(value) if "float" in kind
                           else int(value))
        return cls(**values)  # type: ignore[arg-type]
