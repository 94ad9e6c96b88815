"""Commands that run the service: `run` (the daemon) and `train-now`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from lora_service.cli.common import config_option, echo, load, open_journal
from lora_service.journal import events as ev
from lora_service.store import StateLock


@click.command()
@config_option
def run(config_path: Path) -> None:
    """The daemon, in the foreground (systemd runs this)."""
    from lora_service.daemon.supervisor import Supervisor  # apscheduler, watchdog: 0.15 s

    code = Supervisor(load(config_path)).run()
    click.get_current_context().exit(code)


@click.command("train-now")
@config_option
@click.option("--fresh", is_flag=True, help="Start a new lineage instead of continuing the head.")
def train_now(config_path: Path, fresh: bool) -> None:
    """Ask the running daemon for a run now; with no daemon running, train in the foreground."""
    config = load(config_path)
    if StateLock(config.paths.state).holder() is not None:
        with open_journal(config) as journal:
            (seq,) = journal.append(
                ev.TrainingRequested(fresh=fresh, reason="manual", pid=os.getpid())
            )
        echo(f"asked the running daemon for a run (TrainingRequested, seq {seq})")
        return
    from lora_service.daemon.foreground import train_now as foreground  # only without a daemon

    click.get_current_context().exit(foreground(config, fresh=fresh))


COMMANDS = [run, train_now]
