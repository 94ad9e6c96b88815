"""The metadata of the files users load (torch-free): kohya's `ss_*` keys and the Stability AI
`modelspec.*` keys kohya writes (`ss_metadata`), our own `lora_service_*` provenance keys, the
base model's hashes as WebUI matches them, and the shareable config (no local paths) that the
kohya file and card.json carry. The tensors themselves are `models.adapters`'.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_service import __version__
from lora_service.config import shareable_config, shareable_model_name
from lora_service.versions import witness

# kohya, ComfyUI and WebUI name text-encoder modules as transformers 4's CLIPTextModel did,
# `text_model.encoder.layers.N…`; transformers 5 flattened `text_model` away
TEXT_MODEL = "text_model."
OPTIMIZER = "torch.optim.adamw.AdamW"  # kohya's `ss_optimizer`: the class path (see trainer)
SAI_MODEL_SPEC = "1.0.1"  # the ModelSpec version kohya's library/sai_model_spec.py writes
ARCHITECTURE = "stable-diffusion-v1/lora"
IMPLEMENTATION = "diffusers"  # kohya's value for an SD 1.x LoRA (diffusers module names)


def kohya_module(prefix: str, module: str) -> str:
    """kohya's name for a module: the prefix and the module path with `.` as `_`."""
    return prefix + module.replace(".", "_")


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


def modelspec_metadata(*, title: str, resolution: int, finished_at: str) -> dict[str, str]:
    """The Stability AI ModelSpec keys kohya writes into a LoRA (`sai_model_spec.build_metadata`):
    architecture, implementation, title, resolution `WxH`, date, prediction type. The date is
    the end of training in UTC, ISO 8601 to the second with its offset (kohya writes local time
    without one). The prediction type is epsilon: the trainer's target is the added noise."""
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
        "ss_sd_model_name": shareable_model_name(base_model),
        **(sd_model_hashes or {}),
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": learning_rate,
        "ss_text_encoder_lr": learning_rate if text_encoder else None,
        "ss_lr_scheduler": train.get("lr_scheduler"),
        "ss_lr_warmup_steps": train.get("warmup_ratio") or train.get("warmup_steps", 0),
        "ss_optimizer": optimizer or OPTIMIZER,
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


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "None"  # what kohya writes for unset values
    if isinstance(value, bool):
        return str(value)  # "True"/"False", as kohya's str(bool)
    return str(value)
