"""The history scenario, trained once per session: v1 (batch A), v2 (batch B), a rollback to
v1, v3 (batch C) from v1. Tests that change the state work on a copy (`scenario_copy`).

Accepted batches and training come from the training tests' helpers (real `BatchAccepted`
events and files, real training children), at 32 px with a few steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_service.daemon.foreground import train_now
from tests.training.conftest import add_batch, write_tiny_config

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"epochs": 5, "incremental_epochs": 3, "batch_size": 1, "save_steps": 100,
         "validation_split": 0.25, "promote": "always"}


def lora(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    """`lora-service ARGS --config CONFIG` in a real process (exit codes, stderr and all)."""
    return subprocess.run(
        [sys.executable, "-m", "lora_service", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )


def lora_json(*args: str, config: Path) -> object:
    result = lora(*args, "--json", config=config)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@dataclass(frozen=True)
class Scenario:
    root: Path  # conf/ and state/ (relative paths, so a copied root works on its own)
    a: str
    b: str
    c: str

    @property
    def config(self) -> Path:
        return self.root / "conf" / "config.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state"


def _train(config_path: Path) -> None:
    from lora_service.config import load_config

    assert train_now(load_config(config_path)) == 0


@pytest.fixture(scope="session")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    root = tmp_path_factory.mktemp("history")
    config = write_tiny_config(root, TRAIN, lora={"rank": 4, "alpha": 4})
    state = config.paths.state
    a = add_batch(state, "A", n=4, seed=0)
    _train(config.source)
    b = add_batch(state, "B", n=4, seed=2)
    _train(config.source)
    moved = lora("rollback", "v0001", "--reason", "B was mislabelled", config=config.source)
    assert moved.returncode == 0, moved.stderr
    c = add_batch(state, "C", n=4, seed=3)
    _train(config.source)
    return Scenario(root, a, b, c)


@pytest.fixture
def scenario_copy(scenario: Scenario, tmp_path: Path) -> Scenario:
    """A private copy of the scenario's config and state, for tests that change it."""
    root = tmp_path / "copy"
    shutil.copytree(scenario.root, root)
    return Scenario(root, scenario.a, scenario.b, scenario.c)
