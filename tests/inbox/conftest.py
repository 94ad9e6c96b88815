"""Helpers for intake tests: real image files made with Pillow, real folders, a real journal."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lora_service.config import Config, load_config
from lora_service.inbox.intake import Intake
from lora_service.journal import Journal


def image_bytes(seed: int, size: int = 32, fmt: str = "PNG") -> bytes:
    """A small image whose bytes differ per seed (a gradient plus a seed-dependent colour)."""
    image = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, seed % 7 * 30))
    for x in range(size):
        image.putpixel((x, x), (x * 7 % 256, 255 - seed % 256, 128))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def drop(folder: Path, files: dict[str, bytes | str], ready: bool = True) -> Path:
    """Write a batch folder; str values are written as UTF-8 text."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
    if ready:
        (folder / "READY").write_text("")
    return folder


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Env:
    config: Config
    journal: Journal
    intake: Intake

    @property
    def inbox(self) -> Path:
        return self.config.paths.inbox

    @property
    def state(self) -> Path:
        return self.config.paths.state

    def events(self, *types: str) -> list[Any]:
        return [e.event for e in self.journal.events(types=types)]


@pytest.fixture
def make_env(write_config: Callable[..., Path]) -> Iterator[Callable[..., Env]]:
    opened: list[Journal] = []

    def make(overrides: dict[str, Any] | None = None, **intake_kwargs: Any) -> Env:
        config = load_config(write_config(overrides or {}))
        journal = Journal.for_state(config.paths.state)
        opened.append(journal)
        return Env(config, journal, Intake(journal, config, **intake_kwargs))

    yield make
    for journal in opened:
        journal.close()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()
