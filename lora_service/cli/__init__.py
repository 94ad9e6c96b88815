"""`lora-service`: the command line. One module per command group; this one wires them up.

Exit status: 0 success, 2 bad usage or bad input (one line on stderr), 1 anything else. An
expected error never prints a Python traceback.
"""

from __future__ import annotations

import sys

import click

from lora_service import __version__
from lora_service.cli import daemon, history, imports, journal, media
from lora_service.cli.common import echo
from lora_service.errors import ServiceError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lora-service")
def cli() -> None:
    """Keep a LoRA adapter continuously and safely fine-tuned from an inbox folder."""


for module in (daemon, journal, history, imports, media):
    for command in module.COMMANDS:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    try:
        result = cli.main(args=argv, prog_name="lora-service", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        echo(f"lora-service: {exc.format_message()}", err=True)
        sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
    except ServiceError as exc:
        echo(f"lora-service: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(result if isinstance(result, int) else 0)
