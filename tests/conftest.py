"""Shared fixtures: a temporary state/inbox and a config file written the way users write one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lora_service.config import Config, load_config  # noqa: E402

TINY: dict[str, Any] = {
    "base_model": "builtin:tiny-sd",
    "train": {
        "resolution": 32,
        "batch_size": 2,
        "epochs": 2,
        "save_steps": 2,
        "threads": 1,
        "validation_split": 0.0,
    },
    "inbox": {"settle_seconds": 0.5, "min_image_side": 8},
    "samples": {"enabled": False},
    "logging": {"tensorboard": False},
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a config YAML (tiny defaults + overrides) in tmp_path/conf and return its path."""

    def write(overrides: dict[str, Any] | None = None, *, tiny: bool = True) -> Path:
        data = deep_merge(TINY if tiny else {}, overrides or {})
        data.setdefault("paths", {})
        data["paths"] = {"inbox": "../inbox", "state": "../state", **data["paths"]}
        path = tmp_path / "conf" / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture
def config(write_config: Callable[..., Path]) -> Config:
    return load_config(write_config())
