"""The one YAML configuration file, validated by pydantic.

Unknown keys are errors (a typo must not pass silently), every error names its key path, the bad
value and what is allowed, on one line. Relative paths resolve against the config file's folder,
so `daemon/config.yaml` can say `../inbox` and work from any current directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lora_service.errors import UsageError

DEFAULT_CONFIG = Path("daemon/config.yaml")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
# `name` becomes file names (versions/<name>-vNNNN.safetensors, deploy_dir/<name>.safetensors)
# machine-local sections: never in a file that travels (kohya metadata, card.json), and never
# what decides a run (a run is governed by the rest of its recorded, effective config)
LOCAL_SECTIONS = ("paths", "logging")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _no_nul(path: Path) -> Path:
    if "\x00" in str(path):
        raise ValueError("contains a NUL byte; a path cannot")
    return path


FilePath = Annotated[Path, AfterValidator(_no_nul)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Paths(Section):
    inbox: FilePath = Path("inbox")
    state: FilePath = Path("state")
    deploy_dir: FilePath | None = Field(
        default=None, description="the head's kohya file is copied here on every head change"
    )


class Lora(Section):
    rank: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=8.0, gt=0)
    target_modules: tuple[str, ...] = Field(
        default=("to_q", "to_k", "to_v", "to_out.0"), min_length=1
    )
    train_text_encoder: bool = False


class Train(Section):
    resolution: int = Field(default=64, ge=8, le=4096, multiple_of=8)
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    epochs: int = Field(default=10, ge=1, description="epochs of a lineage's first run")
    max_steps: int | None = Field(default=None, ge=1, description="caps the steps of any run")
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    incremental_lr_factor: float = Field(
        default=0.4, gt=0, le=1, description="incremental runs use learning_rate x this"
    )
    incremental_epochs: int = Field(default=5, ge=1, description="at most this many per increment")
    rehearsal_ratio: float = Field(
        default=0.25, ge=0, le=1,
        description="old images' share of an incremental run: ratio x new / (1 - ratio) of "
        "them (at least 1), drawn anew each run; 1: every old image",
    )
    lr_scheduler: Literal[
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
    ] = "constant"
    warmup_ratio: float = Field(
        default=0.0, ge=0, lt=1,
        description="share of each run's steps spent warming up the learning rate "
        "(ceil(ratio x steps)); the same share for a first run and for an increment",
    )
    warmup_steps: int = Field(
        default=0, ge=0,
        description="warmup of a lineage's first run (at most its steps); an increment warms "
        "up over the same share of its own steps. Set this or warmup_ratio, not both",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="fp16 needs a CUDA GPU; on the CPU use bf16 or no"
    )
    gradient_checkpointing: bool = False
    max_grad_norm: float = Field(default=1.0, gt=0)
    seed: int = Field(default=0, ge=0, lt=2**32)
    threads: int = Field(
        default=2, ge=1, le=256, description="torch threads; resume uses the recorded value"
    )
    save_steps: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    cache_latents: bool = True
    validation_split: float = Field(default=0.1, ge=0, lt=1)
    promote: Literal["always", "if_not_worse", "manual"] = "if_not_worse"
    promote_tolerance: float = Field(
        default=0.05, ge=0, description="allowed relative rise of validation loss on known batches"
    )
    num_processes: int = Field(default=1, ge=1, description=">1 starts the child via accelerate")
    stall_timeout: float = Field(
        default=600.0, gt=0,
        description="a training child with no progress this long is stopped and retried "
        "('90s', '10m' accepted)",
    )

    @field_validator("stall_timeout", mode="before")
    @classmethod
    def _stall_duration(cls, value: Any) -> Any:
        return Schedule._duration(value)

    @field_validator("warmup_ratio", "warmup_steps")
    @classmethod
    def _scheduler_warms_up(cls, value: float, info: ValidationInfo) -> float:
        # diffusers' `constant` schedule ignores num_warmup_steps: a warmup that never happens
        if value and info.data.get("lr_scheduler") == "constant":
            raise ValueError("needs an lr_scheduler that warms up (constant_with_warmup, linear, "
                             "cosine, ...); `constant` has no warmup")
        return value

    @field_validator("warmup_steps")
    @classmethod
    def _one_warmup(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("warmup_ratio"):
            raise ValueError(f"set warmup_steps or warmup_ratio ({info.data['warmup_ratio']}), "
                             "not both")
        return value

    def warmup_for(self, steps: int, first_run_steps: int) -> int:
        """Warmup steps of a run of `steps` steps whose lineage's first run took
        `first_run_steps` (the same number for a first run). Warmup counted in absolute steps
        against each run's own length would leave a short increment below its learning rate
        for good, so an increment keeps the first run's share instead."""
        if self.warmup_ratio:  # round(): 0.1 x 30 is 3.0000000000000004, meant as 3
            return min(steps, math.ceil(round(self.warmup_ratio * steps, 9)))
        if not self.warmup_steps:
            return 0
        first = max(1, first_run_steps)
        return min(steps, -(-min(self.warmup_steps, first) * steps // first))


class Schedule(Section):
    cron: str | None = Field(default=None, description="crontab line, e.g. '0 3 * * *'")
    interval: float | None = Field(
        default=None, gt=0, description="seconds between runs; '90s', '10m', '2h' accepted"
    )
    min_new_images: int = Field(default=1, ge=1)
    on_arrival: bool = Field(default=True, description="train as soon as enough images arrive")

    @field_validator("interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = _DURATION.match(value)
            if not match:
                raise ValueError("must be seconds or a duration like '90s', '10m', '2h', '1d'")
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        return value

    @field_validator("cron")
    @classmethod
    def _crontab(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"is not a crontab line with 5 fields ({exc})") from None
        return value

    @model_validator(mode="after")
    def _one_of(self) -> Schedule:
        if self.cron and self.interval:
            raise ValueError("set cron or interval, not both")
        return self


class Inbox(Section):
    settle_seconds: float = Field(default=5.0, ge=0)
    ready_marker: str = Field(default="READY", min_length=1)
    min_images: int = Field(default=1, ge=1)
    min_image_side: int = Field(default=16, ge=1, description="smaller images are rejected")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="larger images are rejected before decoding"
    )
    max_caption_chars: int = Field(default=1000, ge=1)
    allowed_extensions: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp")

    @field_validator("allowed_extensions")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(ext.lower().lstrip(".") for ext in value)


class Labelling(Section):
    enabled: bool = False
    model: str = Field(default="ViT-B-32", description="open_clip architecture name")
    weights: FilePath | None = Field(default=None, description="local open_clip weights file")
    vocabulary: tuple[str, ...] = (
        "person",
        "face",
        "animal",
        "building",
        "landscape",
        "object",
        "drawing",
        "photo",
    )
    top_k: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _weights_needed(self) -> Labelling:
        if self.enabled and self.weights is None:
            raise ValueError("labelling.enabled needs labelling.weights (a local open_clip file)")
        return self


class Samples(Section):
    enabled: bool = True
    prompts: tuple[str, ...] = ("a photo",)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = Field(default=4, ge=1, le=200)
    guidance_scale: float = Field(default=5.0, ge=0)
    size: int = Field(default=64, ge=8, le=2048, multiple_of=8)
    negative_prompt: str = ""


class Logging(Section):
    file: FilePath | None = Field(default=None, description="default: <state>/logs/train.log")
    json_: bool = Field(default=True, alias="json")
    tensorboard: bool = True
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(Section):
    name: str = Field(
        default="lora-service",
        description="names the exported files: letters, digits, '.', '_', '-' (at most 64)",
    )
    paths: Paths = Paths()
    base_model: str = Field(
        default="builtin:tiny-sd",
        description="builtin:shapes-sd (pretrained, draws), builtin:tiny-sd (random, for tests), "
                    "a local diffusers folder or a local .safetensors file",
    )
    lora: Lora = Lora()
    train: Train = Train()
    schedule: Schedule = Schedule()
    inbox: Inbox = Inbox()
    labelling: Labelling = Labelling()
    samples: Samples = Samples()
    logging: Logging = Logging()

    source: Path | None = Field(default=None, exclude=True, description="the file it came from")

    @field_validator("name")
    @classmethod
    def _file_name_stem(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "must be a file-name stem: 1-64 letters, digits, '.', '_' or '-', starting with "
                "a letter or digit"
            )
        return value

    @field_validator("base_model")
    @classmethod
    def _base_model_path(cls, value: str) -> str:
        _no_nul(Path(value))
        return value

    def effective(self) -> dict[str, Any]:
        """The whole configuration as plain JSON, defaults included: what a run records."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        blob = json.dumps(self.effective(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key (check the spelling; see docs/config.md)"
    if kind == "missing":
        return f"{where}: required"
    message = error["msg"]
    message = message.removeprefix("Value error, ")
    return f"{where}: {error.get('input')!r} — {message}"


def _resolve(base: Path, path: Path | None) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def parse_config(data: Any, source: Path) -> Config:
    """Validate already-parsed YAML; `source` names the file in errors and anchors paths."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: the top level must be a mapping of sections")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise UsageError(f"{source}: {problems}") from None
    base = source.resolve().parent
    paths = Paths(
        inbox=_resolve(base, config.paths.inbox),
        state=_resolve(base, config.paths.state),
        deploy_dir=_resolve(base, config.paths.deploy_dir),
    )
    base_model = config.base_model
    if not base_model.startswith("builtin:"):
        base_model = str(_resolve(base, Path(base_model)))
    update: dict[str, Any] = {"paths": paths, "base_model": base_model, "source": source.resolve()}
    if config.labelling.weights is not None:
        labelling = config.labelling.model_copy(
            update={"weights": _resolve(base, config.labelling.weights)}
        )
        update["labelling"] = labelling
    if config.logging.file is not None:
        update["logging"] = config.logging.model_copy(
            update={"file": _resolve(base, config.logging.file)}
        )
    config = config.model_copy(update=update)
    _check_folders(config, source)
    return config


def _check_folders(config: Config, source: Path) -> None:
    """The three folders must be folders (or not exist yet) and must not contain one another:
    a state inside the inbox would be scanned as a batch and moved, journal and all, into
    `.rejected/`; an inbox inside the state or deploy folder would mix user drops with ours."""
    folders = {
        key: Path(os.path.realpath(path))
        for key, path in (
            ("paths.inbox", config.paths.inbox),
            ("paths.state", config.paths.state),
            ("paths.deploy_dir", config.paths.deploy_dir),
        )
        if path is not None
    }
    for key, path in folders.items():
        if path.exists() and not path.is_dir():
            raise UsageError(f"{source}: {key}: {path} is not a folder")
    for key, path in folders.items():
        for other, within in folders.items():
            if key != other and path.is_relative_to(within):
                where = "is the same folder as" if path == within else "is inside"
                raise UsageError(
                    f"{source}: {key} ({path}) {where} {other} ({within}); the inbox, state "
                    "and deploy folders must be separate"
                )


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read config file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_config(data, path)


def run_config(recorded: dict[str, Any], local: Config) -> Config:
    """The config that governs a run: the effective config its `RunStarted` recorded, with this
    machine's `LOCAL_SECTIONS` (a moved state folder or a new log file changes no run)."""
    mine = local.effective()
    return Config.model_validate({**recorded, **{k: mine[k] for k in LOCAL_SECTIONS}})


# -- what may travel -------------------------------------------------------------------------


def shareable_model_name(base_model: str) -> str:
    """`builtin:tiny-sd` as is; a local folder or file by its name only (no local paths)."""
    return base_model if base_model.startswith("builtin:") else Path(base_model).name


def _config_path_fields() -> list[tuple[str, ...]]:
    """Key paths of the config fields that hold a file system path (from the Config model)."""
    def mentions_path(annotation: Any) -> bool:
        if annotation is Path:
            return True
        return any(mentions_path(a) for a in typing.get_args(annotation))

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = []
        for name, field in model.model_fields.items():
            key = (*prefix, field.alias or name)
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found += walk(annotation, key)
            elif mentions_path(annotation):
                found.append(key)
        return found

    return walk(Config, ())


def shareable_config(effective: dict[str, Any]) -> dict[str, Any]:
    """The effective configuration as it goes into shared files (the kohya file's
    `lora_service_config`, card.json): without the machine-local sections `paths` and
    `logging`, and with every other local path (`base_model`, `labelling.weights`, any field
    the Config model types as a path) cut to its file or folder name. The journal's
    `RunStarted` keeps the configuration as it was."""
    out = copy.deepcopy({k: v for k, v in effective.items() if k not in LOCAL_SECTIONS})
    if isinstance(out.get("base_model"), str):
        out["base_model"] = shareable_model_name(out["base_model"])
    for key in _config_path_fields():
        if key[0] in LOCAL_SECTIONS:
            continue
        parent = out
        for part in key[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(key[-1]), str):
            parent[key[-1]] = Path(parent[key[-1]]).name
    return out
