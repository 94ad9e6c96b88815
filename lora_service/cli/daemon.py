"""Commands that run the service: `run` (the daemon) and `train-now`."""

from __future__ import annotations

from pathlib import Path

import click

from lora_service.cli.common import config_option, load
from lora_service.errors import NotAvailableYet


@click.command()
@config_option
def run(config_path: Path) -> None:
    """The daemon, in the foreground (systemd runs this)."""
    from lora_service.daemon.supervisor import Supervisor

    code = Supervisor(load(config_path)).run()
    click.get_current_context().exit(code)


@click.command("train-now")
@config_option
@click.option("--fresh", is_flag=True, help="Start a new lineage instead of continuing the head.")
def train_now(config_path: Path, fresh: bool) -> None:
    """Ask the running daemon for a run now; with no daemon running, train in the foreground."""
    load(config_path)
    raise NotAvailableYet("train-now")


COMMANDS = [run, train_now]
