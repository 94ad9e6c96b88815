"""Sample images per version and the A/B sheet: what a version draws, not just its loss.

- `render_samples(journal, config, version, unet=None)`: the training child calls it after
  `publish_version`. Every configured prompt × seed is rendered with the base model plus the
  version's adapter into `state/versions/vNNNN/samples/<i>-<seed>.png`, with a labelled
  `grid.png`, and journaled `SamplesRendered` (files with sha256, seconds, the settings). Any
  failure (out of memory included) is journaled `SamplesRendered(error=...)` and swallowed:
  samples are a view of a version, never a reason to fail it or to move the head differently.
- `render_one(...)`: `lora-service sample`; `compare_sheet(...)`: `lora-service compare`.

Determinism: one image per pipeline call with `torch.Generator().manual_seed(seed)`, a DDIM
scheduler (deterministic, built from the base's scheduler config), the version's recorded
thread count, and PNGs saved with no metadata. So the same version + prompt + seed gives the
same bytes on the same machine, whether the adapter is the trained module in the child or the
one loaded from `adapter/` later — `sample V --prompt P --seed S` reproduces a stored sample.

torch is imported only inside the functions that render, so the CLI can import this module and
`compare` can build a sheet from stored, verified samples without loading a model at all.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from lora_service.config import Config
from lora_service.errors import ServiceError, UsageError
from lora_service.journal import Journal
from lora_service.journal.events import SamplesRendered
from lora_service.logs import get_logger
from lora_service.store import atomic_write_bytes
from lora_service.versions.verify import verify_version_files, version_dir

if TYPE_CHECKING:
    import torch

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


def _version_row(journal: Journal, version: str) -> dict[str, Any]:
    from lora_service.versions.publish import version_row

    return version_row(journal, version)


def _run_row(journal: Journal, row: dict[str, Any]) -> dict[str, Any]:
    runs = journal.query("SELECT * FROM runs WHERE run_id = ?", [row["run_id"]])
    return runs[0] if runs else {}


def _threads(journal: Journal, config: Config, row: dict[str, Any]) -> int:
    """The thread count the version was trained with (float results depend on it)."""
    return int(_run_row(journal, row).get("threads") or config.train.threads)


# -- rendering (torch) -----------------------------------------------------------------------


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _verify_adapter(config: Config, version: str, row: dict[str, Any]) -> None:
    files = json.loads(row["files"] or "{}")
    adapter_files = {k: v for k, v in files.items() if "/adapter/" in k}
    problems = verify_version_files(config.paths.state, adapter_files)
    if problems:
        raise ServiceError(f"{version}: adapter files fail verification: {'; '.join(problems)}")


def _from_base(
    journal: Journal, config: Config, version: str, row: dict[str, Any], given: tuple[Any, ...]
) -> tuple[Any, ...]:
    """(unet, text_encoder, vae, tokenizer, scheduler): the given ones, the rest from the
    version's base model; a UNet/text encoder from the base gets the version's adapter."""
    from lora_service.training import base_model
    from lora_service.versions.export import TEXT_ENCODER_DIR, load_peft_into

    state = config.paths.state
    run_config = json.loads(_run_row(journal, row).get("config") or "{}")
    spec = str(run_config.get("base_model") or config.base_model)
    base = base_model.materialise(spec, state)
    if base.sha256 != row["base_sha256"]:
        raise ServiceError(
            f"{version}: trained on base model {row['base_sha256'][:12]}, but {spec} is "
            f"{base.sha256[:12]} now"
        )
    base_unet, base_vae, base_te, base_tokenizer, base_scheduler = (
        base_model.load_pipeline_components(base)
    )
    loaded = (base_unet, base_te, base_vae, base_tokenizer, base_scheduler)
    unet, text_encoder, vae, tokenizer, scheduler = (
        mine if mine is not None else theirs for mine, theirs in zip(given, loaded, strict=True)
    )
    adapter = state / version_dir(version) / "adapter"
    if given[0] is None:
        load_peft_into(unet, adapter)
    if given[1] is None and (adapter / TEXT_ENCODER_DIR).is_dir():
        load_peft_into(text_encoder, adapter / TEXT_ENCODER_DIR)
    return unet, text_encoder, vae, tokenizer, scheduler


class Renderer:
    """A `StableDiffusionPipeline` of the version's base model plus its adapter.

    The training child passes the modules it already holds (the trained `unet`, and the
    `text_encoder`, `vae`, `tokenizer` and noise `scheduler` it encoded with): then nothing is
    loaded from disk. Whatever is not passed comes from the version's base model, checked
    against the sha256 the version was trained on, with the adapter loaded from the version
    folder (its files verified against the journal first)."""

    def __init__(
        self,
        journal: Journal,
        config: Config,
        version: str,
        *,
        unet: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        tokenizer: Any = None,
        scheduler: Any = None,
    ) -> None:
        import lora_service.torch_compat  # noqa: F401  (must precede diffusers)

        # isort: split
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars: noise on a CLI's stderr
        row = _version_row(journal, version)
        if unet is None or text_encoder is None:
            _verify_adapter(config, version, row)
        if any(m is None for m in (unet, text_encoder, vae, tokenizer, scheduler)):
            unet, text_encoder, vae, tokenizer, scheduler = _from_base(
                journal, config, version, row, (unet, text_encoder, vae, tokenizer, scheduler)
            )
        self.version, self.row = version, row
        self.threads = _threads(journal, config, row)
        self.settings = Settings.of(config, self.threads)
        self.pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler.from_config(scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)

    def image(self, prompt: str, seed: int) -> Image.Image:
        """One sample; the modules are put in eval mode for the call and restored after."""
        import torch

        s = self.settings
        modules = [self.pipe.unet, self.pipe.text_encoder, self.pipe.vae]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with _torch_threads(self.threads):
                out = self.pipe(
                    prompt=prompt,
                    negative_prompt=s.negative_prompt or None,
                    num_inference_steps=s.steps,
                    guidance_scale=s.guidance_scale,
                    height=s.size,
                    width=s.size,
                    generator=torch.Generator().manual_seed(int(seed)),
                    output_type="pil",
                )
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)
        return out.images[0].convert("RGB")


def render_samples(
    journal: Journal,
    config: Config,
    version: str,
    *,
    unet: torch.nn.Module | None = None,
    text_encoder: torch.nn.Module | None = None,
    vae: torch.nn.Module | None = None,
    tokenizer: Any = None,
    scheduler: Any = None,
    force: bool = False,
    fault: Callable[[], None] | None = None,
) -> SamplesRendered | None:
    """Render and journal the version's samples; never raises (see the module docstring).

    `unet`/`text_encoder` (with the version's adapter), `vae`, `tokenizer`, `scheduler`: what
    the training child holds, passed to save loading them (see `Renderer`). Returns the
    journaled event, or None when the same samples are already journaled and verify (a child
    restarted after publishing does not render twice) — `force` renders anyway. `fault`: tests
    only, called before rendering (a failure to inject)."""
    log = get_logger("lora_service.samples")
    s = config.samples
    started = time.perf_counter()
    try:
        if not force and stored_samples(journal, config, version) is not None:
            return None
        if fault is not None:
            fault()
        renderer = Renderer(
            journal,
            config,
            version,
            unet=unet,
            text_encoder=text_encoder,
            vae=vae,
            tokenizer=tokenizer,
            scheduler=scheduler,
        )
        folder = config.paths.state / version_dir(version) / SAMPLES_DIR
        rel = f"{version_dir(version)}/{SAMPLES_DIR}"
        files: dict[str, str] = {}
        rows: list[tuple[str, list[Image.Image]]] = []
        images: dict[str, Image.Image] = {}
        for i, prompt in enumerate(s.prompts):
            row = []
            for seed in s.seeds:
                image = renderer.image(prompt, seed)
                name = sample_file(i, seed)
                files[f"{rel}/{name}"] = atomic_write_bytes(folder / name, png_bytes(image))
                images[name] = image
                row.append(image)
            rows.append((f"{i}: {prompt}", row))
        headers = [[version, f"seed {seed}"] for seed in s.seeds]
        grid = sheet(headers, rows, s.size)
        files[f"{rel}/{GRID}"] = atomic_write_bytes(folder / GRID, png_bytes(grid))
        event = SamplesRendered(
            version=version,
            prompts=s.prompts,
            seeds=s.seeds,
            seconds=round(time.perf_counter() - started, 3),
            settings=asdict(renderer.settings),
            files=dict(sorted(files.items())),
        )
        journal.append(event)
        log.info("samples rendered", version=version, images=len(images), seconds=event.seconds)
    except Exception as exc:  # noqa: BLE001  (out of memory included: journaled, not raised)
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("samples failed", version=version, error=reason)
        failed = SamplesRendered(
            version=version,
            prompts=s.prompts,
            seeds=s.seeds,
            seconds=round(time.perf_counter() - started, 3),
            error=reason[:2000],
        )
        try:
            journal.append(failed)
        except Exception as again:  # noqa: BLE001
            log.error("could not journal the samples failure", error=str(again))
        return failed
    if config.logging.tensorboard:
        _tensorboard(config, version, renderer.row, images, grid)
    return event


def _tensorboard(
    config: Config,
    version: str,
    row: dict[str, Any],
    images: dict[str, Image.Image],
    grid: Image.Image,
) -> None:
    """The samples and grid as TensorBoard images at the version's global step (best effort)."""
    try:
        import numpy as np
        from torch.utils.tensorboard import SummaryWriter

        folder = config.paths.state / "logs" / "tensorboard"
        folder.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(log_dir=str(folder), filename_suffix=f".samples.{version}")
        step = int(row.get("step") or 0)
        writer.add_image("samples/grid", np.asarray(grid), step, dataformats="HWC")
        for name, image in images.items():
            tag = f"samples/{name.removesuffix('.png')}"
            writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        writer.close()
    except Exception as exc:  # noqa: BLE001  (a view, never a failure)
        get_logger("lora_service.samples").warning("tensorboard samples failed", error=str(exc))


def render_one(
    journal: Journal, config: Config, version: str, prompt: str, seed: int
) -> Image.Image:
    """`lora-service sample`: one image (UsageError for an unknown version)."""
    _version_row(journal, version)
    return Renderer(journal, config, version).image(prompt, seed)


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
    row = _version_row(journal, version)
    s = config.samples
    wanted = asdict(Settings.of(config, _threads(journal, config, row)))
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
    row = _version_row(journal, version)
    loss = row["val_loss"]
    head = journal.query("SELECT version FROM head WHERE id = 1")
    is_head = " (head)" if head and head[0]["version"] == version else ""
    return [
        f"{version}{is_head}",
        f"parent: {row['parent'] or 'none'}",
        f"val loss: {loss:.4f}" if loss is not None else "val loss: n/a",
    ]


def default_pair(journal: Journal, v1: str | None, v2: str | None) -> tuple[str, str]:
    """V2 defaults to the head, V1 to V2's parent; UsageError when that is not possible."""
    if v2 is None:
        head = journal.query("SELECT version FROM head WHERE id = 1")
        if not head or not head[0]["version"]:
            raise UsageError("compare: there is no head version yet; name two versions")
        v2 = str(head[0]["version"])
    row = _version_row(journal, v2)
    if v1 is None:
        if not row["parent"]:
            raise UsageError(f"compare: {v2} has no parent (first of its lineage); name V1")
        v1 = str(row["parent"])
    _version_row(journal, v1)
    return v1, v2


def compare_sheet(journal: Journal, config: Config, v1: str, v2: str) -> Image.Image:
    """The A/B sheet: 2 columns (V1, V2) × one row per prompt-seed pair, each column labelled
    with version, parent and validation loss. Stored samples are used when they verify and
    match the configured prompts, seeds and settings; otherwise the version is rendered."""
    s = config.samples
    keys = [(i, seed) for i in range(len(s.prompts)) for seed in s.seeds]
    columns = []
    for version in (v1, v2):
        images = stored_samples(journal, config, version)
        if images is None:
            renderer = Renderer(journal, config, version)
            images = {(i, seed): renderer.image(s.prompts[i], seed) for i, seed in keys}
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
