"""Commands about versions and batches: history, loss, audit, head moves, export."""

from __future__ import annotations

from pathlib import Path

import click

from lora_service.cli.common import config_option, json_option, load
from lora_service.errors import NotAvailableYet


@click.command()
@config_option
@json_option
def versions(config_path: Path, as_json: bool) -> None:
    """The version history: parent, batches, images, steps, losses, head marker."""
    load(config_path)
    raise NotAvailableYet("versions")


@click.command()
@config_option
@json_option
@click.option("--version", "version_name", metavar="V", help="Only this version's points.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG chart.")
def loss(config_path: Path, as_json: bool, version_name: str | None, plot: Path | None) -> None:
    """The loss trend: per version and per logged step; a PNG chart on request."""
    load(config_path)
    raise NotAvailableYet("loss")


@click.command()
@config_option
@json_option
@click.argument("version_name", metavar="V")
def audit(config_path: Path, as_json: bool, version_name: str) -> None:
    """Lineage back to the base model, batches with image hashes, config, events, verification."""
    load(config_path)
    raise NotAvailableYet("audit")


@click.command()
@config_option
@click.argument("version_name", metavar="V")
@click.option("--reason", required=True, help="Why (journaled with the head move).")
def rollback(config_path: Path, version_name: str, reason: str) -> None:
    """Move the head to V (refuses a version whose files fail verification)."""
    load(config_path)
    raise NotAvailableYet("rollback")


@click.command()
@config_option
@click.argument("version_name", metavar="V")
def promote(config_path: Path, version_name: str) -> None:
    """Move the head to a version the promotion gate held."""
    load(config_path)
    raise NotAvailableYet("promote")


@click.command()
@config_option
@json_option
def batches(config_path: Path, as_json: bool) -> None:
    """Every batch: status, images, caption sources, reasons for bad files."""
    load(config_path)
    raise NotAvailableYet("batches")


@click.command()
@config_option
@click.argument("batch_id")
@click.option("--reason", default="", help="Why (journaled).")
def requeue(config_path: Path, batch_id: str, reason: str) -> None:
    """Put a batch that is out of the head's lineage back into the next run."""
    load(config_path)
    raise NotAvailableYet("requeue")


@click.command()
@config_option
@click.argument("version_name", metavar="V")
@click.option("--format", "fmt", type=click.Choice(["kohya", "peft"]), default="kohya",
              show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def export(config_path: Path, version_name: str, fmt: str, output: Path, force: bool) -> None:
    """Write a version's adapter in kohya/WebUI or peft format."""
    load(config_path)
    raise NotAvailableYet("export")


COMMANDS = [versions, loss, audit, rollback, promote, batches, requeue, export]
