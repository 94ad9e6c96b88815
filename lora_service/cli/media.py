"""Commands that render, label or draw images: `sample`, `compare`, `label`, `example-batch`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import click

from lora_service import world
from lora_service.cli.common import config_option, echo, load, open_journal
from lora_service.daemon.child import run_once
from lora_service.inbox.labeller import ChildLabeller, label_folder
from lora_service.versions.heads import version_row
from lora_service.versions.samples import compare_sheet, default_pair, write_png


@click.command()
@config_option
@click.argument("version_name", metavar="V")
@click.option("--prompt", required=True, help="The text prompt.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="PNG file to write (atomically).",
)
def sample(config_path: Path, version_name: str, prompt: str, seed: int, output: Path) -> None:
    """Render one image with the base model plus version V's adapter.

    Uses the `samples` settings (steps, guidance_scale, size, negative_prompt) and the thread
    count V was trained with, so a prompt and seed from `samples.prompts`/`samples.seeds`
    gives the same bytes as V's stored sample.
    """
    config = load(config_path)
    with open_journal(config, "read") as journal:
        version_row(journal, version_name)  # a wrong name fails here, before a child starts
    done = json.loads(run_once(config, "", "--sample", version_name, "--prompt", prompt,
                               "--seed", str(seed), "--output", str(output.absolute())))
    echo(f"wrote {output} ({version_name}, seed {seed}, {done['width']}x{done['height']})")


@click.command()
@config_option
@click.argument("v1", required=False)
@click.argument("v2", required=False)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PNG file to write [default: compare-V1-V2.png in the current folder].",
)
def compare(config_path: Path, v1: str | None, v2: str | None, output: Path | None) -> None:
    """The A/B sheet: the same prompts and seeds for both versions side by side.

    Two columns (V1, V2), each labelled with version, parent and validation loss, and one row
    per prompt and seed of the `samples` section. V2 defaults to the head, V1 to V2's parent.
    A version's stored samples are used when they match the settings and verify; otherwise
    it is rendered.
    """
    config = load(config_path)
    with open_journal(config, "read") as journal:
        v1, v2 = default_pair(journal, v1, v2)
        target = output if output is not None else Path(f"compare-{v1}-{v2}.png")
        image = compare_sheet(journal, config, v1, v2)  # None: a column must be rendered
        if image is not None:
            write_png(target, image)
            size = (image.width, image.height)
    if image is None:
        done = json.loads(run_once(config, "", "--compare", v1, v2,
                                   "--output", str(target.absolute())))
        size = (done["width"], done["height"])
    echo(f"wrote {target} ({v1} | {v2}, {size[0]}x{size[1]})")


@click.command()
@config_option
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def label(config_path: Path, directory: Path) -> None:
    """Write captions for a folder of images with open_clip.

    Each image with no `<stem>.txt` (and no `metadata.csv` row) gets a sidecar with the
    `labelling.top_k` best tags of `labelling.vocabulary`; existing captions are never
    overwritten. Needs `labelling.weights`, a local open_clip weights file."""
    config = load(config_path)
    labeller = ChildLabeller(config)  # open_clip runs in `python -m lora_service.labelling`
    written = label_folder(directory, labeller, config.inbox.allowed_extensions)
    for name, caption in sorted(written.items()):
        echo(f"{name}: {caption if caption is not None else 'not readable, skipped'}")
    echo(f"{sum(c is not None for c in written.values())} caption(s) written in {directory}")


def _choices(known: tuple[str, ...]) -> click.Choice:
    return click.Choice(known, case_sensitive=False)


@click.command("example-batch")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", "shapes", multiple=True, type=_choices(world.SHAPES),
              help=f"Shapes to draw (repeat) [default: {', '.join(world.BASE_SHAPES)}]; "
                   f"{', '.join(world.NEW_SHAPES)} are words builtin:shapes-sd never saw.")
@click.option("--colour", "colours", multiple=True, type=_choices(tuple(world.COLOURS)),
              help="Colours to draw (repeat) [default: all].")
@click.option("--hollow", type=click.Choice(["no", "yes", "mixed"]), default="no",
              show_default=True, help="Draw outlines only (a style the base never saw).")
@click.option("-n", "--count", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.IntRange(16, 1024), default=64, show_default=True,
              help="Image side in pixels.")
@click.option("--ready/--no-ready", default=True, show_default=True,
              help="Write the READY marker last, so an inbox takes the folder whole.")
def example_batch(directory: Path, shapes: tuple[str, ...], colours: tuple[str, ...],
                  hollow: str, count: int, seed: int, size: int, ready: bool) -> None:
    """Draw a captioned batch from the procedural world `builtin:shapes-sd` learned from.

    Each image gets a caption sidecar ("a red zorb on a gray background"). DIRECTORY must not
    exist; it appears whole (drawn in a hidden sibling, then renamed), so it may be in the inbox.
    """
    if directory.exists() or directory.is_symlink():
        raise click.UsageError(f"{directory}: exists; name a new folder")
    chosen = world.scenes(count, seed, shapes=shapes or world.BASE_SHAPES,
                          colours=colours or tuple(world.COLOURS),
                          hollow={"no": False, "yes": True, "mixed": None}[hollow])
    # drawn in a hidden sibling (an inbox ignores dot-folders) and renamed whole: nothing
    # half-written is ever visible under the name, and nothing already there is written through
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    except OSError as exc:
        raise click.UsageError(f"{directory.parent}: cannot write here ({exc.strerror})") from None
    try:
        world.write_batch(tmp, chosen, size, ready="READY" if ready else None)
        os.rename(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise click.UsageError(f"{directory}: not written ({exc.strerror})") from None
    echo(f"wrote {count} images with captions to {directory}"
         + (" (and READY)" if ready else ""))


COMMANDS = [sample, compare, label, example_batch]
