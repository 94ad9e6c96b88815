"""A version's adapter on disk (torch side): the peft layout runs start from, the kohya file.

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

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lora_service.models.torch_compat  # noqa: F401  (must precede peft/diffusers)

# isort: split
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from lora_service.store import atomic_write_bytes
from lora_service.versions.metadata import TEXT_MODEL, kohya_module
from lora_service.versions.publish import (
    ADAPTER_CONFIG,
    ADAPTER_NAME,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    TEXT_ENCODER_DIR,
)

Tensors = dict[str, torch.Tensor]
UNET_PREFIX = "lora_unet_"
# SD 1.x has one text encoder: `lora_te_` (SDXL's two are `lora_te1_`/`lora_te2_`)
TEXT_ENCODER_PREFIX = "lora_te_"
_PARTS = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


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


def _text_model_path(module: str) -> str:
    return module if module.startswith(TEXT_MODEL) else TEXT_MODEL + module


# -- the trained adapter, as publishing asks for it --------------------------------------------


class TrainedAdapter:
    """`versions.publish.AdapterFiles` for peft-injected modules: the UNet and, when it was
    trained, the text encoder (`text_encoder` None, or one without an adapter, is left out)."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None):
        self.unet = unet
        self.text_encoder = text_encoder if text_encoder is not None and _has_adapter(
            text_encoder) else None

    @property
    def has_text_encoder(self) -> bool:
        return self.text_encoder is not None

    def write_peft(self, folder: Path, metadata: dict[str, str]) -> dict[str, str]:
        return write_peft(folder, self.unet, self.text_encoder, metadata)

    def write_kohya(self, path: Path, alpha: float, metadata: dict[str, str]) -> str:
        te = peft_state_dict(self.text_encoder) if self.text_encoder is not None else None
        tensors = to_kohya(peft_unet_state_dict(self.unet), alpha=alpha, text_encoder_state=te)
        return write_kohya(path, tensors, metadata)
