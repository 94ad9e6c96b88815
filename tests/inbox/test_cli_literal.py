"""What users control is printed literally by the CLI: never parsed as rich markup."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import Env, drop, image_bytes


def test_rich_markup_in_user_data_is_printed_literally(env: Env) -> None:
    """`[/x]` in a metadata.csv row or a caption is user data: `batches` prints it as it is
    (it used to raise rich's MarkupError, so `batches` was broken for good)."""
    csv = "file_name,text\n[/x],a caption\na.png,[/bold] a [red]cat\n"
    drop(env.inbox / "b", {"a.png": image_bytes(1), "metadata.csv": csv})
    env.intake.scan()
    assert env.config.source is not None
    result = subprocess.run(
        [sys.executable, "-m", "lora_service", "batches", "--config", str(env.config.source)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"},
    )
    assert result.returncode == 0, result.stderr
    assert "[/x]" in result.stdout, result.stdout


def test_control_characters_in_user_data_never_reach_the_terminal(env: Env) -> None:
    """A folder name with ESC sequences (retitle, erase, cursor moves) is shown escaped."""
    name = "cats\x1b]0;pwned\x07\x1b[2K\x1b[1A"
    drop(env.inbox / name, {"a.png": image_bytes(1), "a.txt": "a cat\x1b[31m red"})
    env.intake.scan()
    assert env.config.source is not None
    for command in ("batches", "events", "status"):
        result = subprocess.run(
            [sys.executable, "-m", "lora_service", command, "--config", str(env.config.source)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"},
        )
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout, command
        if command != "status":
            assert "cats\\x1b]0;pwned\\x07" in result.stdout, result.stdout
