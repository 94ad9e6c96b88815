"""The training child as the supervisor sees it: a fresh process, watched, never orphaned.

Started with `subprocess` (never a bare fork: the supervisor has threads, and torch must be
imported fresh in the child) in its own session, so a Ctrl-C on the terminal reaches only the
supervisor, which forwards SIGTERM itself. Every child of the daemon (training, labelling) asks
the kernel to SIGKILL it when the daemon dies (`die_with_parent`, PR_SET_PDEATHSIG), so a
SIGKILLed daemon leaves no orphan behind. stderr is forwarded to ours and its tail kept for
`RunFailed`.

Progress: the child touches a heartbeat file (`lora_service.training.heartbeat`) after every
step and every image it encodes or validates; `Child.idle_for` reads its mtime, so the
supervisor can stop a child that hangs (`train.stall_timeout`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_service.config import Config
from lora_service.errors import ServiceError, UsageError
from lora_service.process import child_env

TAIL_LINES = 40
WORKERS_WAIT_S = 15.0


def run_once(config: Config, what: str, *args: str) -> str:
    """Run the torch child for one job (`--register-base`, `--import-adapter`, `--sample`,
    `--compare`) and return its last line of stdout. The CLI's way to the torch side: torch
    loads in the child, never here. Its `error: …` line (the file, key or value at fault)
    becomes a UsageError (exit 2) or ServiceError, after `what: ` when `what` is given."""
    assert config.source is not None, "a config loaded from a file"
    argv = [sys.executable, "-m", "lora_service.training", "--config", str(config.source),
            *args, "--progress", "off"]
    proc = subprocess.run(argv, env=child_env(), capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        reason = errors[-1] if errors else (lines[-1] if lines else f"exit {proc.returncode}")
        raise (UsageError if proc.returncode == 2 else ServiceError)(
            f"{what}: {reason}" if what else reason)
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def child_argv(config: Config, *args: str) -> list[str]:
    """`python -m lora_service.training ...`, or `accelerate launch` when num_processes > 1."""
    assert config.source is not None, "a config loaded from a file"
    module = ["-m", "lora_service.training", "--config", str(config.source), *args]
    processes = config.train.num_processes
    if processes > 1:
        # --multi_gpu starts one process per GPU; without CUDA the trainer asks accelerate
        # for CPU processes (gloo), so the same command works on a laptop
        # (machines, ranks and addresses of a multi-node run come from `accelerate config`)
        launch = ["-m", "lora_service.training.launch", "--multi_gpu",
                  "--num_processes", str(processes),
                  "--mixed_precision", config.train.mixed_precision, "--dynamo_backend", "no"]
        return [sys.executable, *launch, *module]
    return [sys.executable, *module]


def ask_to_stop(proc: subprocess.Popen[bytes], launcher: bool) -> None:
    """SIGTERM the training child: it checkpoints and exits 0. Under `accelerate launch` the
    workers get it instead (torchrun starts each in its own session): they agree on a step,
    checkpoint and exit 0, and the launcher then exits 0 too, where SIGTERMing the launcher
    would make it exit 1 and the stop would read as a failure."""
    if proc.poll() is not None:
        return
    targets: list[int] = []
    deadline = time.monotonic() + WORKERS_WAIT_S
    while launcher and not targets and proc.poll() is None and time.monotonic() < deadline:
        targets = _children(proc.pid)  # a launcher still starting has none yet
        if not targets:
            time.sleep(0.1)
    for pid in targets or [proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    """The direct children of pid (Linux /proc; empty elsewhere or once it is gone)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(x) for x in fh.read().split()]
    return out


@dataclass
class Child:
    run_id: str
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    launcher: bool = False  # `accelerate launch` with workers below it
    heartbeat: Path | None = None
    last_progress: float = field(default_factory=time.monotonic)
    stalled: str | None = None  # why it was stopped for making no progress
    stalled_at: float = 0.0
    on_exit: Callable[[], None] | None = None  # called when its stderr closes (it exits)
    _beat: int = 0  # the heartbeat's mtime (ns) when last looked at
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, config: Config, run_id: str, heartbeat: Path,
              extra: Sequence[str] = (), on_exit: Callable[[], None] | None = None) -> Child:
        """Start the child for `run_id`; `heartbeat` is (re)created first, so a child that
        never beats is measured from now. `on_exit`: e.g. wake the supervisor's loop, so the
        next run starts as soon as this one ends, not at the next tick."""
        heartbeat.touch()
        beat = heartbeat.stat().st_mtime_ns
        proc = subprocess.Popen(
            child_argv(config, "--run", run_id, "--progress", "off",
                       "--heartbeat", str(heartbeat), *extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env(),
            start_new_session=True,
        )
        child = cls(run_id, proc, launcher=config.train.num_processes > 1, heartbeat=heartbeat,
                    on_exit=on_exit, _beat=beat)
        child._reader = threading.Thread(target=child._pump, name=f"child-{run_id}", daemon=True)
        child._reader.start()
        return child

    def idle_for(self) -> float:
        """Seconds since the child last showed progress (a heartbeat)."""
        now = time.monotonic()
        if self.heartbeat is not None:
            with contextlib.suppress(OSError):
                beat = self.heartbeat.stat().st_mtime_ns
                if beat != self._beat:
                    self._beat, self.last_progress = beat, now
        return now - self.last_progress

    def kill(self) -> None:
        """SIGKILL (its workers, if any, die with it: they asked for PR_SET_PDEATHSIG)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.tail.append(line)
            sys.stderr.write(line)
        sys.stderr.flush()
        if self.on_exit is not None:
            # stderr closes as it exits: wait for that without reaping it (the supervisor's
            # poll does, so its pid is never freed while `ask_to_stop` may still signal it)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
            self.on_exit()

    def poll(self) -> int | None:
        return self.proc.poll()

    def stderr_tail(self) -> str:
        if self._reader is not None:
            self._reader.join(timeout=2)
        return "".join(self.tail)[-4000:]

    def terminate(self, timeout: float) -> int:
        """SIGTERM (the child checkpoints and exits), then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            ask_to_stop(self.proc, self.launcher)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def describe_exit(code: int) -> tuple[str, str | None]:
    """A reason for RunFailed; SIGKILL is reported as a likely OOM kill (as gunicorn does)."""
    if code >= 0:
        return f"training child exited with status {code}", None
    name = signal.Signals(-code).name
    if name == "SIGKILL":
        return "training child was killed by SIGKILL (perhaps out of memory)", name
    return f"training child was killed by {name}", name
