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
- **kohya/WebUI** (`to_kohya`/`write_kohya`): `lora_unet_<module>.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (`lora_te1_…` for the text encoder), from diffusers'
  `convert_state_dict_to_kohya`, plus `ss_*` metadata (`ss_metadata`) that AUTOMATIC1111,
  ComfyUI and kohya's tools read, and our own `lora_service_*` provenance keys.

The alpha trap: `convert_state_dict_to_kohya` writes `alpha = rank` for every module, and
loaders scale by `alpha / rank`, so a LoRA trained with alpha != rank would load with the wrong
strength. `to_kohya` overwrites every `.alpha` with the configured alpha.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import lora_service.torch_compat  # noqa: F401  (must precede peft/diffusers)

# isort: split
import safetensors.torch
import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from lora_service.store import atomic_write_bytes

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


def to_kohya(
    peft_state: Tensors, *, alpha: float, text_encoder_state: Tensors | None = None
) -> Tensors:
    """kohya/WebUI tensors from peft tensors (`peft_state_dict` output), configured alpha.

    Keys get the component prefix diffusers' converter expects (`unet.`, `text_encoder.`),
    or the `lora_unet_`/`lora_te1_` prefix would be lost."""
    prefixed = {f"unet.{k}": v for k, v in peft_state.items()}
    for key, value in (text_encoder_state or {}).items():
        prefixed[f"text_encoder.{key}"] = value
    kohya = convert_state_dict_to_kohya(prefixed)
    out: Tensors = {}
    for key, value in kohya.items():
        if not key.startswith(("lora_unet_", "lora_te1_")):
            raise ValueError(f"kohya conversion produced an unprefixed key: {key}")
        if key.endswith(".alpha"):
            # the converter writes alpha = rank; loaders scale by alpha / rank
            value = torch.tensor(float(alpha), dtype=torch.float32)
        out[key] = value.contiguous()
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


def _epoch_seconds(iso: str) -> str:
    """kohya writes training times as Unix seconds; we keep ISO as well (lora_service_*)."""
    try:
        return str(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return iso


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


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
    optimizer: str = "torch.optim.AdamW",
    text_encoder: bool = False,
) -> dict[str, str]:
    """The safetensors metadata of a kohya file: every value a string, JSON with sorted keys.

    `ss_*` are kohya's keys (what AUTOMATIC1111, ComfyUI and the kohya GUI show). Where our
    meaning differs, the docstring of the key says so here:
    - `ss_steps` is the *global* step, counted across the lineage (the parent's steps plus this
      run's); `ss_max_train_steps` is this run's steps, `ss_epoch` this run's epochs.
    - `ss_sd_model_hash` / `ss_new_sd_model_hash`: our base model identity, a sha256 over its
      weight files (the first 10 hex / the whole); for a single-file base that is the file's
      sha256, which is kohya's `ss_new_sd_model_hash` too.
    - `ss_tag_frequency` / `ss_dataset_dirs` are keyed by batch (our dataset folders).
    `lora_service_*` keys are ours: version, parent and the parent's kohya file sha256, the
    sha256 manifest of every image and caption trained on, the journal position and hash when
    the version was made, and the run's effective configuration minus `paths` and `logging`.

    The file is meant to be shared (WebUI users upload LoRAs), so nothing machine-local goes in:
    no absolute paths (a local base model is named by its file or folder name). `card.json` in
    the version folder keeps the complete record."""
    lora = effective_config.get("lora", {})
    train = effective_config.get("train", {})
    resolution = train.get("resolution")
    dirs = {folder: {"img_count": len(texts), "n_repeats": 1} for folder, texts in captions.items()}
    meta: dict[str, Any] = {
        "ss_output_name": output_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": lora.get("rank"),
        "ss_network_alpha": float(lora.get("alpha", 0.0)),
        "ss_network_args": _canonical({"target_modules": list(lora.get("target_modules", []))}),
        "ss_network_train_unet_only": not text_encoder,
        "ss_network_train_text_encoder_only": False,
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
        "ss_sd_model_name": _shareable_model_name(base_model),
        "ss_sd_model_hash": base_sha256[:10],
        "ss_new_sd_model_hash": base_sha256,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": learning_rate,
        "ss_text_encoder_lr": learning_rate if text_encoder else None,
        "ss_lr_scheduler": train.get("lr_scheduler"),
        "ss_lr_warmup_steps": train.get("warmup_steps"),
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": train.get("max_grad_norm"),
        "ss_steps": step,
        "ss_max_train_steps": steps,
        "ss_epoch": epochs,
        "ss_num_epochs": epochs,
        "ss_num_train_images": images,
        "ss_batch_size_per_device": train.get("batch_size"),
        "ss_gradient_accumulation_steps": train.get("gradient_accumulation_steps"),
        "ss_gradient_checkpointing": train.get("gradient_checkpointing"),
        "ss_cache_latents": train.get("cache_latents"),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_seed": seed,
        "ss_mixed_precision": train.get("mixed_precision"),
        "ss_tag_frequency": _canonical(_tag_frequency(captions)),
        "ss_dataset_dirs": _canonical(dirs),
        "ss_training_started_at": _epoch_seconds(started_at),
        "ss_training_finished_at": _epoch_seconds(finished_at),
        "ss_training_comment": f"lora-service {version} (run {run_id})",
        "lora_service_version": version,
        "lora_service_run_id": run_id,
        "lora_service_parent": parent or "",
        "lora_service_parent_sha256": parent_sha256 or "",
        "lora_service_base_sha256": base_sha256,
        "lora_service_manifest": _canonical(manifest),
        "lora_service_journal_seq": journal_seq,
        "lora_service_journal_hash": journal_hash,
        "lora_service_config": _canonical(
            {k: v for k, v in effective_config.items() if k not in LOCAL_SECTIONS}
        ),
        "lora_service_training_started_at": started_at,
        "lora_service_training_finished_at": finished_at,
    }
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
