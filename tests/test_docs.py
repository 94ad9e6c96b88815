"""The CLI and config reference are generated from the code; these fail when they drift.

One test per file and per command, so the first drift does not hide the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_service.cli import cli
from lora_service.docgen import rendered

ROOT = Path(__file__).resolve().parents[1]
RENDERED = rendered()


@pytest.mark.parametrize("path", sorted(RENDERED), ids=lambda p: p.name)
def test_generated_reference_is_up_to_date(path: Path) -> None:
    assert path.exists(), f"{path} missing: run `make docs`"
    assert path.read_text() == RENDERED[path], f"{path} is out of date: run `make docs`"


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_and_is_in_the_readme(name: str) -> None:
    command = cli.commands[name]
    assert command.help and len(command.help) > 20, name
    assert f"`{name}" in (ROOT / "README.md").read_text(), f"README.md does not mention `{name}`"
