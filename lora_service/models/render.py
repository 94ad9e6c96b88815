"""Rendering a version's samples (torch side): the base model plus the version's adapter.

- `render_samples(journal, config, version, unet=None)`: the training child calls it after
  publishing. Every configured prompt × seed is rendered into
  `state/versions/vNNNN/samples/<i>-<seed>.png`, with a labelled `grid.png`, and journaled
  `SamplesRendered` (files with sha256, seconds, the settings). Any failure (out of memory
  included) is journaled `SamplesRendered(error=...)` and swallowed: samples are a view of a
  version, never a reason to fail it or to move the head differently.
- `Renderer(...).image(prompt, seed)`: `lora-service sample` and the columns of `compare` that
  have no stored samples (both run in the torch child, `python -m lora_service.training`).

Determinism: one image per pipeline call with `torch.Generator().manual_seed(seed)`, a DDIM
scheduler (deterministic, built from the base's scheduler config), the version's recorded
thread count, and PNGs saved with no metadata. So the same version + prompt + seed gives the
same bytes on the same machine, whether the adapter is the trained module in the child or the
one loaded from `adapter/` later — `sample V --prompt P --seed S` reproduces a stored sample.
The file names, settings, sheets and stored-sample checks are torch-free: `versions.samples`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy
import torch
from PIL import Image

import lora_service.models.torch_compat  # noqa: F401  (must precede diffusers)

# isort: split
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers.utils import logging as hf_logging

from lora_service.config import Config
from lora_service.errors import ServiceError
from lora_service.journal import Journal, queries
from lora_service.journal.events import SamplesRendered
from lora_service.logs import get_logger
from lora_service.models import base_model
from lora_service.models.adapters import TEXT_ENCODER_DIR, load_peft_into
from lora_service.models.judge import Judge, asked
from lora_service.store import atomic_write_bytes
from lora_service.versions.heads import version_row
from lora_service.versions.publish import recorded_config
from lora_service.versions.samples import (
    GRID,
    SAMPLES_DIR,
    Settings,
    png_bytes,
    sample_file,
    sheet,
    stored_samples,
    threads_of,
)
from lora_service.versions.verify import verify_version_files, version_dir


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
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
    state = config.paths.state
    run = queries.run(journal, row["run_id"]) if row["run_id"] else None
    # a trained version's base is its run's; an imported one (no run) was checked against the
    # configured base when it was imported, and the sha256 below holds it to that
    spec = str(recorded_config(run)["base_model"]) if run else config.base_model
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
        hf_logging.disable_progress_bar()  # "Loading weights" bars: noise on a CLI's stderr
        row = version_row(journal, version)
        if unet is None or text_encoder is None:
            _verify_adapter(config, version, row)
        if any(m is None for m in (unet, text_encoder, vae, tokenizer, scheduler)):
            unet, text_encoder, vae, tokenizer, scheduler = _from_base(
                journal, config, version, row, (unet, text_encoder, vae, tokenizer, scheduler)
            )
        self.version, self.row = version, row
        self.threads = threads_of(journal, config, row)
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
    force: bool = False,
    fault: Callable[[], None] | None = None,
    **held: Any,
) -> SamplesRendered | None:
    """Render and journal the version's samples; never raises (see the module docstring).

    `held`: `Renderer`'s `unet`/`text_encoder` (with the version's adapter), `vae`,
    `tokenizer`, `scheduler` — what the training child holds, passed to save loading them.
    Returns the journaled event, or None when the same samples are already journaled and
    verify (a child restarted after publishing does not render twice) — `force` renders anyway.
    `fault`: tests only, called before rendering (a failure to inject)."""
    log = get_logger("lora_service.samples")
    s = config.samples
    started = time.perf_counter()
    try:
        if not force and stored_samples(journal, config, version) is not None:
            return None
        if fault is not None:
            fault()
        renderer = Renderer(journal, config, version, **held)
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
        judged = judge_samples(journal, renderer.row,
                               [(prompt, image) for prompt, (_, row) in
                                zip(s.prompts, rows, strict=True) for image in row])
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
            judged=judged,
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


def judge_samples(journal: Journal, row: dict[str, Any],
                  samples: list[tuple[str, Image.Image]]) -> dict[str, dict[str, float]]:
    """The judge of the version's base model on its samples, per concept the prompts name: the
    share that shows it (shape and style) and the share in the prompt's colour. {} when the
    base ships no judge, no prompt names a concept of its world, or the judge fails (logged:
    a judge is a view of the samples, never a reason to lose them)."""
    base = queries.base_model(journal, row["base_sha256"]) or {}
    try:
        path = base_model.judge_for(base["spec"]) if base.get("kind") == "builtin" else None
        if path is None:
            return {}
        prompts = [prompt for prompt, _ in samples]
        marks = Judge.load(path).score([image for _, image in samples], prompts)
    except Exception as exc:  # noqa: BLE001
        get_logger("lora_service.samples").warning("judge failed", error=str(exc))
        return {}
    by: dict[str, list[dict[str, bool]]] = {}
    for prompt, mark in zip(prompts, marks, strict=True):
        concept = asked(prompt).concept
        if concept is not None:
            by.setdefault(concept, []).append(mark)
    out: dict[str, dict[str, float]] = {}
    for concept, ms in sorted(by.items()):
        out[concept] = {"shows": round(sum(m["concept"] for m in ms) / len(ms), 4),
                        "images": len(ms)}
        coloured = [m["colour"] for m in ms if "colour" in m]
        if coloured:
            out[concept]["colour"] = round(sum(coloured) / len(coloured), 4)
    return out


def _tensorboard(
    config: Config,
    version: str,
    row: dict[str, Any],
    images: dict[str, Image.Image],
    grid: Image.Image,
) -> None:
    """The samples and grid as TensorBoard images at the version's global step (best effort)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only when used

        folder = config.paths.state / "logs" / "tensorboard"
        folder.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(log_dir=str(folder), filename_suffix=f".samples.{version}")
        step = int(row.get("step") or 0)
        writer.add_image("samples/grid", numpy.asarray(grid), step, dataformats="HWC")
        for name, image in images.items():
            tag = f"samples/{name.removesuffix('.png')}"
            writer.add_image(tag, numpy.asarray(image), step, dataformats="HWC")
        writer.close()
    except Exception as exc:  # noqa: BLE001  (a view, never a failure)
        get_logger("lora_service.samples").warning("tensorboard samples failed", error=str(exc))


def render_one(
    journal: Journal, config: Config, version: str, prompt: str, seed: int
) -> Image.Image:
    """`lora-service sample`: one image (UsageError for an unknown version)."""
    version_row(journal, version)
    return Renderer(journal, config, version).image(prompt, seed)


def render_columns(
    journal: Journal, config: Config
) -> Callable[[str, list[tuple[int, int]]], dict[tuple[int, int], Image.Image]]:
    """`versions.samples.compare_sheet`'s `render`: a version's (prompt index, seed) images."""

    def render(version: str, keys: list[tuple[int, int]]) -> dict[tuple[int, int], Image.Image]:
        renderer = Renderer(journal, config, version)
        return {(i, seed): renderer.image(config.samples.prompts[i], seed) for i, seed in keys}

    return render
