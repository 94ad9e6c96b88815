"""What every command shares: `--config`, `--json`, output helpers and the exit-code rule."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lora_service.config import DEFAULT_CONFIG, Config, load_config
from lora_service.journal import Journal

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_ENV = "LORA_SERVICE_CONFIG"


def config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=lambda: os.environ.get(CONFIG_ENV, str(DEFAULT_CONFIG)),
        show_default=f"${CONFIG_ENV} or {DEFAULT_CONFIG}",
        help="The service's YAML configuration file.",
    )(func)


def json_option(func: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Machine-readable JSON output."
    )(func)


def open_journal(config: Config, mode: Literal["read", "write"] = "write") -> Journal:
    """The state's journal; never creates one (only the daemon and training do): no journal is
    "no state at PATH" (exit 2). "read" works on a read-only state and never writes."""
    return Journal.for_state(config.paths.state, mode=mode)


def load(config_path: Path) -> Config:
    return load_config(config_path)


# C0 and C1 control characters (tab and newline kept): a file name can carry ESC sequences that
# retitle, erase or move the operator's terminal; they are shown escaped, never sent.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters as `\\xNN`: what users control reaches a terminal inert."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def echo(text: str = "", *, err: bool = False) -> None:
    """click.echo for text that may hold user data (names, captions, reasons)."""
    click.echo(printable(text), err=err)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def emit_json_line(data: Any) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def table(
    title: str | None,
    columns: list[str],
    rows: Iterable[Iterable[Any]],
    *,
    min_width: int = 100,
    no_wrap_first: bool = False,
) -> None:
    """A readable table for people (rich); scripts use --json. Every cell is literal text: a
    caption or file name like `[/x]` is user data, never rich markup."""
    grid = Table(title=Text(printable(title)) if title else None, show_lines=False)
    for i, column in enumerate(columns):
        grid.add_column(Text(column), no_wrap=no_wrap_first and i == 0)
    for row in rows:
        grid.add_row(*(Text(printable("" if cell is None else str(cell))) for cell in row))
    Console(width=max(min_width, Console().width)).print(grid)
