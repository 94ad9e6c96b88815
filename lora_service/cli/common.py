"""What every command shares: `--config`, `--json`, output helpers and the exit-code rule."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

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


def open_journal(config: Config) -> Journal:
    return Journal.for_state(config.paths.state)


def load(config_path: Path) -> Config:
    return load_config(config_path)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def emit_json_line(data: Any) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """A readable table for people (rich); scripts use --json."""
    from rich.console import Console
    from rich.table import Table

    grid = Table(title=title, show_lines=False)
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*("" if cell is None else str(cell) for cell in row))
    Console(width=max(100, Console().width)).print(grid)
