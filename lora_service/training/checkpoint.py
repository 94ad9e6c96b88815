"""Checkpoints: `state/runs/<run_id>/checkpoints/step-NNNNNN/` (NNNNNN = global step).

A checkpoint folder holds
- `adapter.safetensors`: the LoRA weights,
- `optimizer.pt`, `scheduler.pt`: state dicts saved with `torch.save` and read back only with
  `torch.load(weights_only=True)` (tensors and plain containers; nothing is unpickled),
- `rng.safetensors`: the torch CPU RNG state,
- `grad_scaler.json` (fp16 on a GPU only): the GradScaler's state dict (scale, growth tracker and
  factors: plain numbers), so a resumed fp16 run does not restart its loss scale at 65536,
- `trainer_state.json`: run id, global and local step, epoch, the epoch's data order and the
  position in it, threads, config digest, losses so far,
- `manifest.json`: the sha256 of every other file, written last.

It is written into `.step-NNNNNN.tmp-<pid>/`, every file fsynced, then renamed to its final name
and the folder fsynced: a half-written checkpoint never has a `step-*` name, and one damaged later
fails its manifest check, so `latest_valid` skips it and takes the one before.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from lora_service.store import fsync_dir, sha256_file

PATTERN = re.compile(r"^step-(\d{6,})$")
MANIFEST = "manifest.json"
GRAD_SCALER = "grad_scaler.json"


def checkpoints_dir(state_dir: Path, run_id: str) -> Path:
    return state_dir / "runs" / run_id / "checkpoints"


def folder_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "trainer_state.json").read_text())

    def adapter(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / "adapter.safetensors")

    def torch_state(self, name: str) -> Any:
        return torch.load(self.path / name, weights_only=True)

    def rng(self) -> torch.Tensor:
        return load_file(self.path / "rng.safetensors")["cpu"]

    def grad_scaler(self) -> dict[str, Any] | None:
        """The fp16 grad scaler's state, None when the run had none."""
        path = self.path / GRAD_SCALER
        return json.loads(path.read_text()) if path.exists() else None


def _torch_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def save(
    state_dir: Path,
    run_id: str,
    step: int,
    *,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    trainer_state: dict[str, Any],
    grad_scaler: dict[str, Any] | None = None,
    rng: torch.Tensor | None = None,
    crash_at_step: int | None = None,
) -> tuple[Path, dict[str, str]]:
    """Write one checkpoint atomically; return its folder and {state-relative path: sha256}.
    `grad_scaler`: `GradScaler.state_dict()` of an fp16 run, None otherwise. `rng`: the torch
    RNG state taken with the rest (default: now). `crash_at_step`: tests only
    (`Faults.crash_in_checkpoint`)."""
    root = checkpoints_dir(state_dir, run_id)
    root.mkdir(parents=True, exist_ok=True)
    final = root / folder_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # serialised in memory, written by us: a full disk is an OSError (ENOSPC) that says so,
    # where torch.save and save_file to a path raise RuntimeError("unexpected pos ...")
    (tmp / "adapter.safetensors").write_bytes(st_save(adapter, metadata={"step": str(step)}))
    (tmp / "optimizer.pt").write_bytes(_torch_bytes(optimizer))
    if crash_at_step == step:
        os.kill(os.getpid(), signal.SIGKILL)  # a power cut half-way through the write
    (tmp / "scheduler.pt").write_bytes(_torch_bytes(scheduler))
    rng = torch.get_rng_state() if rng is None else rng
    (tmp / "rng.safetensors").write_bytes(st_save({"cpu": rng}))
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, sort_keys=True, indent=1))
    if grad_scaler is not None:
        (tmp / GRAD_SCALER).write_text(json.dumps(grad_scaler, sort_keys=True))
    hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(hashes, sort_keys=True, indent=1))
    for p in tmp.iterdir():
        _fsync_file(p)
    fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an attempt that died after rename
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    hashes[MANIFEST] = sha256_file(final / MANIFEST)
    rel = final.relative_to(state_dir).as_posix()
    return final, {f"{rel}/{name}": sha for name, sha in sorted(hashes.items())}


def verify(path: Path) -> str | None:
    """None when every file matches the manifest, else why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"manifest unreadable ({exc.__class__.__name__})"
    for name in ("adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors",
                 "trainer_state.json"):
        if name not in manifest:
            return f"manifest lacks {name}"
    for name, sha in manifest.items():
        try:
            if sha256_file(path / name) != sha:
                return f"{name} does not match its sha256"
        except OSError:
            return f"{name} missing"
    return None


def all_checkpoints(state_dir: Path, run_id: str) -> list[Checkpoint]:
    """Every `step-*` folder of the run, newest first (not yet verified)."""
    root = checkpoints_dir(state_dir, run_id)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        match = PATTERN.match(p.name)
        if match and p.is_dir():
            found.append(Checkpoint(p, int(match.group(1))))
    return sorted(found, key=lambda c: c.step, reverse=True)


def latest_valid(state_dir: Path, run_id: str) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint whose files verify, and why each newer one was skipped."""
    skipped = []
    for ckpt in all_checkpoints(state_dir, run_id):
        problem = verify(ckpt.path)
        if problem is None:
            return ckpt, skipped
        skipped.append(f"{ckpt.path.name}: {problem}")
    return None, skipped


def clean_temporaries(state_dir: Path, run_id: str) -> None:
    """Remove half-written checkpoint folders left by a process that died while writing."""
    root = checkpoints_dir(state_dir, run_id)
    if root.is_dir():
        for p in root.glob(".step-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def prunable(state_dir: Path, run_id: str, keep: int) -> list[Checkpoint]:
    """Checkpoints beyond the newest `keep` ones."""
    return all_checkpoints(state_dir, run_id)[keep:]


def files_of(state_dir: Path, ckpt: Checkpoint) -> list[str]:
    return sorted(p.relative_to(state_dir).as_posix() for p in ckpt.path.iterdir() if p.is_file())


def snapshot(value: Any) -> Any:
    """A copy of a state dict's tensors in host memory, detached from training (an optimizer
    keeps updating its own in place while a checkpoint is being written)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(snapshot(v) for v in value)
    return value


class Writer:
    """Writes checkpoints in a thread while training goes on, one at a time: serialising,
    hashing and fsyncing cost the steps nothing but what the snapshot itself takes. A failed
    write (a full disk) is raised by the next `submit` or `wait`."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="checkpoint")
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as exc:  # noqa: BLE001  (raised in the training thread)
            self._error = exc

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Until the last checkpoint is durable and journaled; its failure, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
