"""`lora-service import`: an adapter trained elsewhere becomes a lineage root and the head.

The work (reading the file, checking it against the base model, writing the version) needs
torch, so it runs in a child process, `python -m lora_service.training --import-adapter`
(`lora_service.models.importing`); this side holds the state lock and reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from lora_service.cli.common import config_option, echo, load
from lora_service.daemon.child import run_once
from lora_service.store import StateLock


@click.command("import")
@config_option
@click.argument("path", metavar="FILE", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["kohya", "peft"]),
              help="The adapter's format; detected from its keys when not given.")
def import_adapter(config_path: Path, path: Path, fmt: str | None) -> None:
    """Import a LoRA trained elsewhere (kohya or peft) as a new lineage root and the head.

    FILE is a kohya/WebUI `.safetensors` (`lora_unet_…`/`lora_te…` keys), a peft adapter folder
    (`adapter_config.json` + `adapter_model.safetensors`) or a diffusers
    `pytorch_lora_weights.safetensors` (`unet.`/`text_encoder.` keys). It must fit the configured
    base model and `lora.rank`, `lora.alpha`, `lora.target_modules` and
    `lora.train_text_encoder`; a mismatch is refused naming the key, and nothing is stored.
    It is stored as the next version (peft layout, kohya file, card.json), journaled
    `VersionImported` with the file's sha256, and becomes the head whatever `train.promote`
    says (an import is an explicit choice); the next run continues from it with the
    incremental learning rate and epochs. Needs the state lock: stop the daemon first."""
    config = load(config_path)
    args = ["--import-adapter", str(path.resolve()), *(["--format", fmt] if fmt else [])]
    with StateLock(config.paths.state):
        line = run_once(config, f"import {path.name}", *args)
    done = json.loads(line)
    echo(f"imported {done['origin']} ({done['format']}, rank {done['rank']}, alpha "
         f"{done['alpha']:g}, {done['modules']} modules, sha256 {done['sha256']}) as "
         f"{done['version']}")
    echo(f"head: {done['previous_head'] or '-'} -> {done['version']}; the next run continues "
         "from it")


COMMANDS = [import_adapter]
