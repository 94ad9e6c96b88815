"""Sample images per version and the A/B sheet: what a version draws, not just its loss.

Torch-free: the file names and `Settings` of a version's samples, the check that its stored
samples still match the config and verify (`stored_samples`), the sheet layout (`grid.png`
and the compare sheet) and the default compare pair. Rendering is the torch side's
(`models.render`, in the training child); `lora-service compare` builds the sheet here from
stored, verified samples without loading a model, and asks the child only for the columns it
has to render.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from lora_service.config import Config
from lora_service.errors import UsageError
from lora_service.journal import Journal, queries
from lora_service.journal.events import SamplesRendered
from lora_service.store import atomic_write_bytes
from lora_service.versions.heads import version_row
from lora_service.versions.verify import verify_version_files, version_dir

SAMPLES_DIR = "samples"
GRID = "grid.png"
SCHEDULER = "DDIMScheduler"

# sheet layout (grid.png and the compare sheet), in pixels
CELL_MIN = 192  # small samples are upscaled (nearest) by a whole factor to at least this
PAD = 8
LINE = 14


@dataclass(frozen=True)
class Settings:
    """Everything besides prompt, seed and adapter that decides a sample's pixels."""

    steps: int
    guidance_scale: float
    size: int
    negative_prompt: str
    scheduler: str
    threads: int

    @classmethod
    def of(cls, config: Config, threads: int) -> Settings:
        s = config.samples
        return cls(s.steps, float(s.guidance_scale), s.size, s.negative_prompt, SCHEDULER, threads)


def sample_file(index: int, seed: int) -> str:
    """`<i>-<seed>.png`: i is the prompt's position in `samples.prompts`."""
    return f"{index}-{seed}.png"


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes with no metadata (no time, no text chunks): same pixels, same bytes."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# -- the version's facts ---------------------------------------------------------------------


def threads_of(journal: Journal, config: Config, row: dict[str, Any]) -> int:
    """The thread count the version was trained with (float results depend on it)."""
    run = queries.run(journal, row["run_id"]) or {}
    return int(run.get("threads") or config.train.threads)


# -- rendering (torch) -----------------------------------------------------------------------


# -- stored samples --------------------------------------------------------------------------


def stored_samples(
    journal: Journal, config: Config, version: str
) -> dict[tuple[int, int], Image.Image] | None:
    """The version's journaled samples for the configured prompts, seeds and settings, when
    its latest `SamplesRendered` succeeded with those and every file verifies; else None."""
    last = None
    for stored in journal.events(types=("SamplesRendered",)):
        if stored.payload.get("version") == version:
            last = stored.event
    if not isinstance(last, SamplesRendered) or last.error:
        return None
    row = version_row(journal, version)
    s = config.samples
    wanted = asdict(Settings.of(config, threads_of(journal, config, row)))
    if tuple(last.prompts) != s.prompts or tuple(last.seeds) != s.seeds or last.settings != wanted:
        return None
    if verify_version_files(config.paths.state, last.files):
        return None
    rel = f"{version_dir(version)}/{SAMPLES_DIR}"
    out: dict[tuple[int, int], Image.Image] = {}
    for i in range(len(s.prompts)):
        for seed in s.seeds:
            path = f"{rel}/{sample_file(i, seed)}"
            if path not in last.files:
                return None
            with Image.open(config.paths.state / path) as image:
                out[(i, seed)] = image.convert("RGB")
    return out


# -- sheets ----------------------------------------------------------------------------------


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def cell_size(size: int) -> int:
    """A sample's side on a sheet: upscaled by a whole factor to at least CELL_MIN."""
    return size * max(1, math.ceil(CELL_MIN / size))


def sheet_size(columns: int, rows: int, header_lines: int, size: int) -> tuple[int, int]:
    """(width, height) of `sheet(...)`: a header band, then per row a caption line and cells."""
    cell = cell_size(size)
    return (
        PAD + columns * (cell + PAD),
        2 * PAD + header_lines * LINE + rows * (LINE + cell + PAD),
    )


def cell_origin(column: int, row: int, header_lines: int, size: int) -> tuple[int, int]:
    """Top-left pixel of a cell's image on the sheet."""
    cell = cell_size(size)
    return (
        PAD + column * (cell + PAD),
        2 * PAD + header_lines * LINE + row * (LINE + cell + PAD) + LINE,
    )


def _fit(text: str, width: int, font: Any) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def sheet(
    headers: list[list[str]], rows: list[tuple[str, list[Image.Image]]], size: int
) -> Image.Image:
    """Columns with header lines, rows with a caption line above their cells."""
    header_lines = max((len(h) for h in headers), default=0)
    width, height = sheet_size(len(headers), len(rows), header_lines, size)
    cell = cell_size(size)
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    font = _font()
    for c, lines in enumerate(headers):
        x = PAD + c * (cell + PAD)
        for n, line in enumerate(lines):
            draw.text((x, PAD + n * LINE), _fit(line, cell, font), fill="black", font=font)
    for r, (caption, images) in enumerate(rows):
        x0, y0 = cell_origin(0, r, header_lines, size)
        draw.text(
            (x0, y0 - LINE + 1), _fit(caption, width - 2 * PAD, font), fill=(60, 60, 60), font=font
        )
        for c, image in enumerate(images):
            x, y = cell_origin(c, r, header_lines, size)
            out.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
    return out


def _label(journal: Journal, version: str) -> list[str]:
    row = version_row(journal, version)
    loss = row["val_loss"]
    is_head = " (head)" if queries.head_version(journal) == version else ""
    lines = [
        f"{version}{is_head}",
        f"parent: {row['parent'] or 'none'}",
        f"val loss: {loss:.4f}" if loss is not None else "val loss: n/a",
    ]
    judged = queries.judged(journal).get(version)
    for concept, score in (judged or {}).items():  # what the base's judge saw in its samples
        lines.append(f"judge: {concept} {score['shows']:.0%}")
    return lines


def default_pair(journal: Journal, v1: str | None, v2: str | None) -> tuple[str, str]:
    """V2 defaults to the head, V1 to V2's parent; UsageError when that is not possible."""
    if v2 is None:
        v2 = queries.head_version(journal)
        if not v2:
            raise UsageError("compare: there is no head version yet; name two versions")
    row = version_row(journal, v2)
    if v1 is None:
        if not row["parent"]:
            raise UsageError(f"compare: {v2} has no parent (first of its lineage); name V1")
        v1 = str(row["parent"])
    version_row(journal, v1)
    return v1, v2


Render = Callable[[str, list[tuple[int, int]]], dict[tuple[int, int], Image.Image]]


def compare_sheet(
    journal: Journal, config: Config, v1: str, v2: str, render: Render | None = None
) -> Image.Image | None:
    """The A/B sheet: 2 columns (V1, V2) × one row per prompt-seed pair, each column labelled
    with version, parent and validation loss. Stored samples are used when they verify and
    match the configured prompts, seeds and settings; a column without them is rendered by
    `render(version, keys)` — or, with no `render` (the torch-free side), None is returned and
    the caller asks the torch child for the sheet."""
    s = config.samples
    keys = [(i, seed) for i in range(len(s.prompts)) for seed in s.seeds]
    columns = []
    for version in (v1, v2):
        images = stored_samples(journal, config, version)
        if images is None:
            if render is None:
                return None
            images = render(version, keys)
        columns.append(images)
    rows = [
        (f'"{s.prompts[i]}"  seed {seed}', [columns[0][(i, seed)], columns[1][(i, seed)]])
        for i, seed in keys
    ]
    return sheet([_label(journal, v1), _label(journal, v2)], rows, s.size)


def write_png(path: Path, image: Image.Image) -> str:
    """Write a PNG atomically; OSError becomes a one-line UsageError naming the path."""
    try:
        return atomic_write_bytes(Path(path), png_bytes(image))
    except OSError as exc:
        raise UsageError(f"{path}: cannot write ({exc.strerror or exc})") from None
