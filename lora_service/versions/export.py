"""A version's adapter on disk: the peft layout we train from, the kohya file users load.

Imports torch, peft and diffusers: only the training child and `lora-service export`/`sample`
import this module, never the daemon.

Two formats, both safetensors:

- **peft layout** (`write_peft`/`load_peft_into`), what incremental runs start from. A folder:
  - `adapter_model.safetensors`: the LoRA tensors exactly as trained (fp32 on CPU), keyed the
    way `PeftModel.save_pretrained` keys them, `base_model.model.<module>.lora_A.weight` /
    `.lora_B.weight` (no adapter name), with safetensors metadata `{"format": "pt"}` (plus a
    published version's journal witness, `lora_service.versions.witness`);
  - `adapter_config.json`: the `LoraConfig` (`r`, `lora_alpha`, `target_modules`, …), sorted
    JSON, readable by `LoraConfig.from_pretrained`;
  - `text_encoder/` with the same two files when the text encoder was trained.
  peft's `PeftModel` loader reads it as well as `load_peft_into` does.
- **kohya/WebUI** (`to_kohya`/`write_kohya`): per module `<name>.lora_down.weight`,
  `.lora_up.weight` and `.alpha`, named as kohya's sd-scripts, ComfyUI and AUTOMATIC1111 name
  SD 1.x modules: `lora_unet_down_blocks_0_attentions_0_…_to_q` and, for the text encoder,
  `lora_te_text_model_encoder_layers_0_self_attn_q_proj` (the `text_model` segment that
  transformers 5 dropped from CLIPTextModel's module paths is put back); diffusers'
  `load_lora_weights` reads the same file. Its metadata: kohya's `ss_*` keys and the Stability AI
  `modelspec.*` keys kohya writes (`ss_metadata`), and our own `lora_service_*` provenance keys.

The alpha trap: diffusers' `convert_state_dict_to_kohya` writes `alpha = rank` for every
module, and loaders scale by `alpha / rank`, so a LoRA trained with alpha != rank would load
with the wrong strength. `to_kohya` writes the configured alpha.

No exported file holds a local absolute path: the kohya metadata and card.json carry the
configuration as `shareable_config` gives it, and `adapter_config.json` has no
`base_model_name_or_path` that is one (transformers fills in the folder the text encoder was
loaded from).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lora_service.torch_compat  # noqa: F401  (must precede peft/diffusers)

# isort: split
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from lora_service.store import atomic_write_bytes
from lora_service.versions import witness

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TEXT_ENCODER_DIR = "text_encoder"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module paths
ADAPTER_NAME = "default"

Tensors = dict[str, torch.Tensor]
LOCAL_SECTIONS = ("paths", "logging")  # machine-local config, kept out of shared files


# -- peft ------------------------------------------------------------------------------------


def _has_adapter(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> bool:
    return adapter_name in (getattr(model, "peft_config", None) or {})


def peft_state_dict(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> Tensors:
    """The LoRA tensors of any peft-injected model, keyed by module path (no prefix, no adapter
    name), detached copies on CPU. Works for `model.add_adapter(...)` (diffusers/transformers)
    and for a `PeftModel` wrapper alike."""
    if not _has_adapter(model, adapter_name):
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r}")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {
        key.removeprefix(PEFT_PREFIX): value.detach().to("cpu").clone().contiguous()
        for key, value in state.items()
    }


def peft_unet_state_dict(unet: torch.nn.Module) -> Tensors:
    """The UNet's LoRA tensors (`down_blocks.1.….to_q.lora_A.weight` → tensor)."""
    return peft_state_dict(unet)


def _config_json(config: LoraConfig) -> bytes:
    data = config.to_dict()
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
    for key, value in data.items():  # a local folder is no base model id anywhere else
        if isinstance(value, str) and os.path.isabs(value):
            data[key] = None
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _write_one(folder: Path, model: torch.nn.Module, metadata: dict[str, str]) -> dict[str, str]:
    state = {PEFT_PREFIX + k: v for k, v in peft_state_dict(model).items()}
    weights = safetensors.torch.save(state, metadata={"format": "pt", **metadata})
    return {
        ADAPTER_WEIGHTS: atomic_write_bytes(folder / ADAPTER_WEIGHTS, weights),
        ADAPTER_CONFIG: atomic_write_bytes(
            folder / ADAPTER_CONFIG, _config_json(model.peft_config[ADAPTER_NAME])
        ),
    }


def write_peft(
    folder: Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write the peft layout (see the module docstring) and return {path in folder: sha256}.

    `metadata` joins `format` in each weights file's safetensors metadata (a published version
    puts its journal witness there, `versions.witness`). Each file is written atomically;
    callers that need the whole folder to appear at once build it under a temporary name and
    rename it (`publish_version` does)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = metadata or {}
    files = _write_one(folder, unet, metadata)
    if text_encoder is not None and _has_adapter(text_encoder):
        for name, sha in _write_one(folder / TEXT_ENCODER_DIR, text_encoder, metadata).items():
            files[f"{TEXT_ENCODER_DIR}/{name}"] = sha
    return files


def read_peft_config(folder: Path) -> LoraConfig:
    """The `LoraConfig` stored in a peft folder (local file only, never a hub)."""
    path = Path(folder) / ADAPTER_CONFIG
    return LoraConfig(**_known_fields(json.loads(path.read_text(encoding="utf-8"))))


def _known_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Drop keys a `LoraConfig` does not take as arguments (e.g. `peft_type`, written by
    `to_dict`), the same filtering `LoraConfig.from_pretrained` does."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    return {k: v for k, v in data.items() if k in names}


def _geometry(config: LoraConfig) -> dict[str, Any]:
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return {"r": config.r, "lora_alpha": float(config.lora_alpha), "target_modules": targets}


def load_peft_into(
    model: torch.nn.Module, folder: Path, adapter_name: str = ADAPTER_NAME
) -> LoraConfig:
    """Load a peft folder written by `write_peft` into `model` (a UNet, or a text encoder with
    `folder / "text_encoder"`), bit-exactly, and return its `LoraConfig`.

    A model without the adapter gets it injected from the stored config (`add_adapter`; peft
    initialises the new layers first, which consumes torch RNG: restore RNG state afterwards if
    it matters). A model that already has the adapter (built by the trainer from its config)
    must have the same rank, alpha and targets, else ValueError naming the difference. Every
    stored tensor must land on a LoRA parameter and every LoRA parameter must be loaded."""
    folder = Path(folder)
    config = read_peft_config(folder)
    if _has_adapter(model, adapter_name):
        have, want = _geometry(model.peft_config[adapter_name]), _geometry(config)
        diff = [
            f"{k} {have[k]!r} (model) vs {want[k]!r} ({folder})" for k in have if have[k] != want[k]
        ]
        if diff:
            raise ValueError("LoRA geometry differs: " + "; ".join(diff))
    elif isinstance(model, PeftModel):
        raise ValueError(f"PeftModel has no adapter {adapter_name!r}")
    else:
        model.add_adapter(config, adapter_name=adapter_name)
    state = safetensors.torch.load_file(str(folder / ADAPTER_WEIGHTS))
    if not isinstance(model, PeftModel):
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [
        k
        for k in getattr(result, "missing_keys", []) or []
        if "lora_" in k and f".{adapter_name}." in k
    ]
    if unexpected or missing:
        raise ValueError(
            f"{folder / ADAPTER_WEIGHTS} does not fit the model: "
            f"unexpected {unexpected[:3]}, missing {missing[:3]}"
        )
    return config


# -- kohya -----------------------------------------------------------------------------------

UNET_PREFIX = "lora_unet_"
# SD 1.x has one text encoder: `lora_te_` (SDXL's two are `lora_te1_`/`lora_te2_`)
TEXT_ENCODER_PREFIX = "lora_te_"
# kohya, ComfyUI and WebUI name text-encoder modules as transformers 4's CLIPTextModel did,
# `text_model.encoder.layers.N…`; transformers 5 flattened `text_model` away
TEXT_MODEL = "text_model."
_PARTS = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def kohya_module(prefix: str, module: str) -> str:
    """kohya's name for a module: the prefix and the module path with `.` as `_`."""
    return prefix + module.replace(".", "_")


def _text_model_path(module: str) -> str:
    return module if module.startswith(TEXT_MODEL) else TEXT_MODEL + module


def to_kohya(
    peft_state: Tensors, *, alpha: float, text_encoder_state: Tensors | None = None
) -> Tensors:
    """kohya/WebUI tensors from peft tensors (`peft_state_dict` output), configured alpha.

    Per module: `<name>.lora_down.weight` (lora_A), `<name>.lora_up.weight` (lora_B) and
    `<name>.alpha`, where `<name>` is `lora_unet_<module path>` for the UNet and
    `lora_te_text_model_<module path>` for the text encoder (see `kohya_module`), the names
    kohya's sd-scripts, ComfyUI and AUTOMATIC1111 give SD 1.x modules and diffusers reads back.
    Every `.alpha` is the configured alpha (loaders scale by alpha / rank). Anything but plain
    LoRA A/B weights (DoRA magnitudes, biases) is refused with ValueError."""
    out: Tensors = {}
    parts = (
        (UNET_PREFIX, peft_state, lambda m: m),
        (TEXT_ENCODER_PREFIX, text_encoder_state or {}, _text_model_path),
    )
    for prefix, state, path in parts:
        for key, value in state.items():
            suffix = next((s for s in _PARTS if key.endswith(s)), None)
            if suffix is None:
                raise ValueError(f"{key}: not a LoRA A/B weight; the kohya format holds only those")
            name = kohya_module(prefix, path(key.removesuffix(suffix)))
            out[name + _PARTS[suffix]] = value.contiguous()
            out[name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def _tag_frequency(captions: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: per dataset folder, how often each comma-separated tag
    occurs in the captions trained on."""
    out: dict[str, dict[str, int]] = {}
    for folder, texts in sorted(captions.items()):
        counts: dict[str, int] = {}
        for text in texts:
            for tag in (t.strip() for t in text.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        out[folder] = dict(sorted(counts.items()))
    return out


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)


def _epoch_seconds(iso: str) -> str:
    """kohya writes training times as Unix seconds (`str(time.time())`); we keep ISO as well
    (lora_service_*)."""
    try:
        return str(_when(iso).timestamp())
    except ValueError:
        return iso


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def optimizer_name(cls: type) -> str:
    """kohya's `ss_optimizer`: the optimizer's class path, `torch.optim.adamw.AdamW` (kohya
    adds `(k=v,…)` for optimizer arguments given on its command line; we pass none)."""
    return f"{cls.__module__}.{cls.__name__}"


def session_id(run_id: str) -> str:
    """kohya's `ss_session_id` is a random integer in [0, 2**32] per training invocation ("which
    group of epochs the model came from"); ours is drawn from the run id, so a resumed run keeps
    it and every version of one run shares it."""
    return str(int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:4], "big"))


def legacy_model_hash(path: Path) -> str:
    """WebUI's old model hash, which kohya writes as `ss_sd_model_hash` (sd-scripts
    `train_util.model_hash`, WebUI `sd_models.model_hash`): sha256 of the 64 KiB at offset
    1 MiB, its first 8 hex digits."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def sd_model_hashes(kind: str | None, path: Path | None, sha256: str) -> dict[str, str]:
    """`ss_sd_model_hash` and `ss_new_sd_model_hash` of the base model, as kohya computes them
    and as WebUI (and model sites) match a checkpoint by: for a single-file base, the file's
    old 8-digit hash and its sha256 (`sha256` is the registered file sha256, kohya's
    `calculate_sha256`). A diffusers folder or the builtin is no checkpoint file those tools
    could know, so both keys are left out rather than filled with a hash nothing matches
    (kohya writes `IsADirectory`); `lora_service_base_sha256` names it instead (our digest over
    its weight files). An unreadable file also leaves the old hash out."""
    if kind != "single_file" or path is None:
        return {}
    out = {"ss_new_sd_model_hash": sha256}
    try:
        out["ss_sd_model_hash"] = legacy_model_hash(path)
    except OSError:
        pass
    return out


def _config_path_fields() -> list[tuple[str, ...]]:
    """Key paths of the config fields that hold a file system path (from the Config model)."""
    import typing

    from pydantic import BaseModel

    from lora_service.config import Config

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
        out["base_model"] = _shareable_model_name(out["base_model"])
    for key in _config_path_fields():
        if key[0] in LOCAL_SECTIONS:
            continue
        parent = out
        for part in key[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(key[-1]), str):
            parent[key[-1]] = Path(parent[key[-1]]).name
    return out


SAI_MODEL_SPEC = "1.0.1"  # the ModelSpec version kohya's library/sai_model_spec.py writes
ARCHITECTURE = "stable-diffusion-v1/lora"
IMPLEMENTATION = "diffusers"  # kohya's value for an SD 1.x LoRA (diffusers module names)


def modelspec_metadata(*, title: str, resolution: int, finished_at: str) -> dict[str, str]:
    """The Stability AI ModelSpec keys kohya writes into a LoRA (`sai_model_spec.build_metadata`):
    architecture, implementation, title, resolution `WxH`, date, prediction type. The date is
    the end of training in UTC, ISO 8601 to the second with its offset (kohya writes local time
    without one). The prediction type is epsilon: the trainer's target is the added noise."""
    from lora_service import __version__

    try:
        date = _when(finished_at).replace(microsecond=0).isoformat()
    except ValueError:
        date = finished_at
    return {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.implementation_version": f"lora-service/{__version__}",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": date,
        "modelspec.prediction_type": "epsilon",
    }


def ss_metadata(
    *,
    output_name: str,
    version: str,
    parent: str | None,
    parent_sha256: str | None,
    run_id: str,
    effective_config: dict[str, Any],
    base_sha256: str,
    base_model: str,
    learning_rate: float,
    step: int,
    steps: int,
    epochs: int,
    images: int,
    seed: int,
    captions: dict[str, list[str]],
    manifest: dict[str, str],
    started_at: str,
    finished_at: str,
    journal_seq: int,
    journal_hash: str,
    optimizer: str | None = None,
    text_encoder: bool = False,
    title: str | None = None,
    sd_model_hashes: dict[str, str] | None = None,
    validation_images: int | None = None,
) -> dict[str, str]:
    """The safetensors metadata of a kohya file: every value a string, as kohya's
    train_network writes them (`str()` of the value: `True`, `None`, `0.0001`, `(64, 64)`; JSON
    where kohya writes JSON), plus `modelspec.*` (`modelspec_metadata`) and our own
    `lora_service_*` provenance keys.

    `output_name` is the configured `name`, the deploy file's stem: WebUI takes
    `ss_output_name` as the LoRA's alias, so `<lora:NAME:1>` keeps resolving whichever version
    the deployed file holds. `title` (default `<name>-<version>`, the version file's stem) tells
    versions apart. `sd_model_hashes` comes from `sd_model_hashes()`: both base hashes for a
    single-file base, none for a folder. `validation_images` is written when given.

    Where our meaning differs from kohya's:
    - `ss_steps` is the *global* step, counted across the lineage (the parent's steps plus this
      run's); `ss_max_train_steps` is this run's steps, `ss_epoch` this run's epochs.
    - `ss_batch_size_per_device` is each process's share of `train.batch_size` (processes
      split every batch), `ss_total_batch_size` the images per optimizer step, and
      `ss_num_batches_per_epoch` the (micro-)batches of one epoch.
    - `ss_tag_frequency` / `ss_dataset_dirs` are keyed by batch (our dataset folders).
    - `ss_lr_warmup_steps` is `train.warmup_ratio` when set (kohya reads a value below 1 as a
      share of the steps too), else `train.warmup_steps`.
    What we do not do is written as kohya writes its defaults: no clip skip, noise offset,
    buckets, augmentation, caption dropout, regularisation images (`None`, `False`, `0`,
    `null`). `lora_service_*` keys: version, parent and the parent's kohya file sha256, the
    sha256 manifest of every image and caption trained on, the journal position and hash when
    the version was made, and the run's configuration as `shareable_config` gives it.

    The file is meant to be shared (WebUI users upload LoRAs), so nothing machine-local goes in:
    no absolute paths (a local base model is named by its file or folder name)."""
    lora = effective_config.get("lora", {})
    train = effective_config.get("train", {})
    resolution = int(train.get("resolution") or 0)
    batch = int(train.get("batch_size") or 1)
    processes = max(1, int(train.get("num_processes") or 1))
    accumulation = int(train.get("gradient_accumulation_steps") or 1)
    dirs = {folder: {"img_count": len(texts), "n_repeats": 1} for folder, texts in captions.items()}
    meta: dict[str, Any] = {
        "ss_session_id": session_id(run_id),
        "ss_output_name": output_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": lora.get("rank"),
        "ss_network_alpha": float(lora.get("alpha", 0.0)),
        "ss_network_dropout": None,
        "ss_network_args": _canonical({"target_modules": list(lora.get("target_modules", []))}),
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
        "ss_sd_model_name": _shareable_model_name(base_model),
        **(sd_model_hashes or {}),
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": learning_rate,
        "ss_text_encoder_lr": learning_rate if text_encoder else None,
        "ss_lr_scheduler": train.get("lr_scheduler"),
        "ss_lr_warmup_steps": train.get("warmup_ratio") or train.get("warmup_steps", 0),
        "ss_optimizer": optimizer or optimizer_name(torch.optim.AdamW),
        "ss_max_grad_norm": train.get("max_grad_norm"),
        "ss_loss_type": "l2",
        "ss_steps": step,
        "ss_max_train_steps": steps,
        "ss_epoch": epochs,
        "ss_num_epochs": epochs,
        "ss_num_train_images": images,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": -(-images // batch),
        "ss_batch_size_per_device": -(-batch // processes),
        "ss_total_batch_size": batch * accumulation,
        "ss_gradient_accumulation_steps": accumulation,
        "ss_gradient_checkpointing": train.get("gradient_checkpointing"),
        "ss_cache_latents": train.get("cache_latents"),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_resize_interpolation": "bicubic",
        "ss_enable_bucket": False,
        "ss_bucket_no_upscale": False,
        "ss_min_bucket_reso": None,
        "ss_max_bucket_reso": None,
        "ss_bucket_info": json.dumps(None),
        "ss_color_aug": False,
        "ss_flip_aug": False,
        "ss_random_crop": False,
        "ss_shuffle_caption": False,
        "ss_keep_tokens": 0,
        "ss_caption_dropout_rate": 0.0,
        "ss_caption_dropout_every_n_epochs": 0,
        "ss_caption_tag_dropout_rate": 0.0,
        "ss_clip_skip": None,
        "ss_max_token_length": None,
        "ss_noise_offset": None,
        "ss_multires_noise_iterations": None,
        "ss_adaptive_noise_scale": None,
        "ss_zero_terminal_snr": False,
        "ss_min_snr_gamma": None,
        "ss_debiased_estimation": False,
        "ss_full_fp16": False,
        "ss_seed": seed,
        "ss_mixed_precision": train.get("mixed_precision"),
        "ss_validation_split": train.get("validation_split"),
        "ss_tag_frequency": _canonical(_tag_frequency(captions)),
        "ss_dataset_dirs": _canonical(dirs),
        "ss_reg_dataset_dirs": _canonical({}),
        "ss_training_started_at": _epoch_seconds(started_at),
        "ss_training_finished_at": _epoch_seconds(finished_at),
        "ss_training_comment": f"lora-service {version} (run {run_id})",
        **witness.metadata(version, journal_seq, journal_hash),
        "lora_service_run_id": run_id,
        "lora_service_parent": parent or "",
        "lora_service_parent_sha256": parent_sha256 or "",
        "lora_service_base_sha256": base_sha256,
        "lora_service_manifest": _canonical(manifest),
        "lora_service_config": _canonical(shareable_config(effective_config)),
        "lora_service_training_started_at": started_at,
        "lora_service_training_finished_at": finished_at,
    }
    if validation_images is not None:
        meta["ss_num_validation_images"] = validation_images
    meta.update(
        modelspec_metadata(
            title=title or f"{output_name}-{version}",
            resolution=resolution,
            finished_at=finished_at,
        )
    )
    return {k: _as_text(v) for k, v in sorted(meta.items())}


def _shareable_model_name(base_model: str) -> str:
    """`builtin:tiny-sd` as is; a local folder or file by its name only (no local paths)."""
    return base_model if base_model.startswith("builtin:") else Path(base_model).name


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "None"  # what kohya writes for unset values
    if isinstance(value, bool):
        return str(value)  # "True"/"False", as kohya's str(bool)
    return str(value)


def addnet_hashes(tensors: Tensors, metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` / `sshs_legacy_hash`, computed as kohya's
    `precalculate_safetensors_hashes` does (over the file with only the `ss_*` metadata; the
    model hash skips the header), which AUTOMATIC1111 reads instead of hashing the file."""
    blob = safetensors.torch.save(
        tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")}
    )
    body = blob[8 + int.from_bytes(blob[:8], "little") :]
    return {
        "sshs_model_hash": hashlib.sha256(body).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }


def kohya_bytes(tensors: Tensors, metadata: dict[str, str]) -> bytes:
    """The kohya file's bytes: tensors, our metadata, `format` and kohya's addnet hashes."""
    meta = {"format": "pt", **metadata, **addnet_hashes(tensors, metadata)}
    return safetensors.torch.save(tensors, metadata=meta)


def write_kohya(path: Path, tensors: Tensors, metadata: dict[str, str]) -> str:
    """Write the kohya file atomically (temp name, fsync, rename) and return its sha256."""
    return atomic_write_bytes(Path(path), kohya_bytes(tensors, metadata))


def read_kohya(path: Path) -> tuple[Tensors, dict[str, str]]:
    """(tensors, metadata) of a kohya file."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return safetensors.torch.load_file(str(path)), metadata
