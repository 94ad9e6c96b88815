"""Commands that render or label images: `sample`, `compare`, `label`."""

from __future__ import annotations

from pathlib import Path

import click

from lora_service.cli.common import config_option, load
from lora_service.errors import NotAvailableYet


@click.command()
@config_option
@click.argument("version_name", metavar="V")
@click.option("--prompt", required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def sample(config_path: Path, version_name: str, prompt: str, seed: int, output: Path) -> None:
    """Render one image with the base model plus version V's adapter."""
    load(config_path)
    raise NotAvailableYet("sample")


@click.command()
@config_option
@click.argument("v1", required=False)
@click.argument("v2", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path))
def compare(config_path: Path, v1: str | None, v2: str | None, output: Path | None) -> None:
    """The A/B sheet: the same prompts and seeds for both versions side by side."""
    load(config_path)
    raise NotAvailableYet("compare")


@click.command()
@config_option
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def label(config_path: Path, directory: Path) -> None:
    """Write captions for a folder of images with open_clip."""
    load(config_path)
    raise NotAvailableYet("label")


COMMANDS = [sample, compare, label]
