"""Generate docs/cli.md and docs/config.md from the code, so the reference cannot drift.

`python -m lora_service.docgen --write` rewrites them; `--check` (and tests/test_docs.py) fails
when the checked-in files differ from what the code says.
"""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path

import click
from pydantic import BaseModel

from lora_service.cli import cli
from lora_service.config import Config

DOCS = Path(__file__).resolve().parents[1] / "docs"


def render_cli() -> str:
    out = [
        "# CLI reference",
        "",
        "Generated from `lora-service --help` by `make docs`; do not edit by hand.",
        "",
        "Exit status: 0 success, 2 bad usage or bad input (one line on stderr), 1 anything else.",
        "",
    ]
    out += ["```", cli.get_help(_context(cli, "lora-service")), "```", ""]
    for name in sorted(cli.commands):
        command = cli.commands[name]
        help_text = command.get_help(_context(command, f"lora-service {name}"))
        out += [f"## `lora-service {name}`", "", "```", help_text, "```", ""]
    return "\n".join(out)


def _context(command: click.Command, name: str) -> click.Context:
    # fixed widths: the text must not depend on the terminal that generates it
    return click.Context(command, info_name=name, terminal_width=100, max_content_width=100,
                         help_option_names=["-h", "--help"])


def _type_name(annotation: typing.Any) -> str:
    text = re.sub(r"Annotated\[([^,\]]+), [^\]]*\)\]", r"\1", str(annotation))
    for prefix in ("typing.", "pathlib.", "<class '", "'>"):
        text = text.replace(prefix, "")
    return text.replace("NoneType", "None").replace("|", "\\|")


_BOUNDS = {"ge": "≥ {}", "gt": "> {}", "le": "≤ {}", "lt": "< {}",
           "multiple_of": "multiple of {}", "min_length": "at least {} items"}


def _constraints(metadata: list[typing.Any]) -> str:
    parts = []
    for item in metadata:
        for attr, template in _BOUNDS.items():
            if getattr(item, attr, None) is not None:
                parts.append(template.format(getattr(item, attr)))
    return ", ".join(parts)


def _is_section(annotation: typing.Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _section(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    fields = sorted(model.model_fields.items(), key=lambda kv: _is_section(kv[1].annotation))
    for name, field in fields:
        if field.exclude:
            continue
        key = field.alias or name
        annotation = field.annotation
        if _is_section(annotation):
            out += ["", f"## `{prefix}{key}`", ""]
            if annotation.__doc__:
                out += [annotation.__doc__.strip(), ""]
            out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
            _section(annotation, f"{prefix}{key}.", out)
            continue
        default = field.default
        if isinstance(default, tuple):
            default = list(default)
        constraints = _constraints(field.metadata)
        meaning = field.description or ""
        if constraints:
            meaning = f"{meaning} ({constraints})" if meaning else constraints
        shown = "" if default is None else f"`{default}`"
        out.append(f"| `{prefix}{key}` | {_type_name(annotation)} | {shown} | {meaning} |")


def render_config() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from `lora_service/config.py` by `make docs`; do not edit by hand.",
        "One YAML file; unknown keys are errors; relative paths resolve against the file's "
        "folder. Every key is optional.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    _section(Config, "", out)
    return "\n".join(out) + "\n"


def rendered() -> dict[Path, str]:
    return {DOCS / "cli.md": render_cli(), DOCS / "config.md": render_config()}


def main(argv: list[str]) -> int:
    stale = [path for path, text in rendered().items()
             if not path.exists() or path.read_text() != text]
    if "--write" in argv:
        for path, text in rendered().items():
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
        return 0
    for path in stale:
        print(f"{path}: out of date; run `make docs`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
