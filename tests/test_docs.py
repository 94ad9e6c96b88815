"""The CLI and config reference are generated from the code; these fail when they drift."""

from __future__ import annotations

from pathlib import Path

from lora_service.cli import cli
from lora_service.docgen import rendered

ROOT = Path(__file__).resolve().parents[1]


def test_generated_reference_is_up_to_date() -> None:
    for path, text in rendered().items():
        assert path.exists(), f"{path} missing: run `make docs`"
        assert path.read_text() == text, f"{path} is out of date: run `make docs`"


def test_every_command_has_help_and_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, command in cli.commands.items():
        assert command.help and len(command.help) > 20, name
        assert f"`{name}" in readme, f"README.md does not mention `{name}`"
