"""Fixtures for training tests: accepted batches written straight into a state folder.

The intake is built elsewhere; these tests need only what it leaves behind: the files under
`state/batches/<batch_id>/` and a `BatchAccepted` event.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from lora_service.config import Config, load_config
from lora_service.journal import Journal
from lora_service.journal.events import BatchAccepted, ImageRecord
from lora_service.store import sha256_file

ROOT = Path(__file__).resolve().parents[2]
# the same tiny settings as tests/conftest.py's TINY, for module-scoped set-ups
TINY_TRAIN = {"resolution": 32, "batch_size": 2, "epochs": 2, "save_steps": 2, "threads": 1,
              "validation_split": 0.0}


def write_tiny_config(root: Path, train: dict | None = None, **top: object) -> Config:
    """A config file in root/conf with state ../state (for fixtures wider than one test)."""
    import yaml

    data = {
        "base_model": "builtin:tiny-sd",
        "paths": {"inbox": "../inbox", "state": "../state"},
        "train": {**TINY_TRAIN, **(train or {})},
        "samples": {"enabled": False},
        "logging": {"tensorboard": False},
        **top,
    }
    path = root / "conf" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def add_batch(state: Path, name: str, n: int = 4, seed: int = 0, size: int = 32) -> str:
    """Write n small images with captions as an accepted batch; return its batch_id."""
    tmp = state / "tmp-batch" / name
    tmp.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img = Image.new("RGB", (size, size), ((seed * 70 + i * 40) % 256, (i * 90) % 256, 120))
        for x in range(0, size, 4):
            img.putpixel((x, (x + i + seed) % size), (255, 255, 255))
        path = tmp / f"img{i}.png"
        img.save(path)
        caption = f"a {('red', 'green', 'blue', 'grey')[(seed + i) % 4]} square {name}"
        records.append(ImageRecord(file=path.name, sha256=sha256_file(path), caption=caption,
                                   caption_source="sidecar", width=size, height=size))
    key = "".join(sorted(r.sha256 + r.caption for r in records))
    batch_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    dest = state / "batches" / batch_id
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    files = {f"batches/{batch_id}/{r.file}": r.sha256 for r in records}
    with Journal.for_state(state) as journal:
        journal.append(BatchAccepted(name=name, batch_id=batch_id, images=tuple(records),
                                     moved_to=f".accepted/{name}", files=files))
    return batch_id


def run_child(config: Config, run_id: str, *faults: str,
              wait: bool = True) -> subprocess.Popen[bytes] | int:
    """The training child as the daemon starts it; `faults`: `--fault` specs
    (training/faults.py) on its command line."""
    argv = [sys.executable, "-m", "lora_service.training", "--config", str(config.source),
            "--run", run_id, "--progress", "off", *(a for f in faults for a in ("--fault", f))]
    proc = subprocess.Popen(argv, cwd=ROOT, env=os.environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"child exit {proc.returncode}:\n{err.decode()[-3000:]}")
    return proc.returncode


@pytest.fixture
def make_config(write_config: Callable[..., Path]) -> Callable[..., Config]:
    def make(overrides: dict | None = None) -> Config:
        return load_config(write_config(overrides or {}))

    return make


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One materialised builtin shared by the session (copied into each state folder)."""
    from lora_service.models.base_model import materialise

    state = tmp_path_factory.mktemp("base-state")
    materialise("builtin:tiny-sd", state)
    return state / "base"


@pytest.fixture
def state_with_base(base_cache: Path, tmp_path: Path) -> Path:
    import shutil

    state = tmp_path / "state"
    shutil.copytree(base_cache, state / "base")
    return state
