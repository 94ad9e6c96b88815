"""Base models: the embedded builtins, a local diffusers folder, a single-file SD 1.x.

Public API (others call these):
- `materialise(spec, state_dir) -> BaseModel`: `builtin:tiny-sd` (random, for mechanical tests)
  is built offline from `lora_service.models.tiny_sd` (configs) and
  `torch.manual_seed(tiny_sd.SEED)`; `builtin:shapes-sd` (pretrained, it draws) from the weights
  shipped in the package (`shapes_sd.py`), checked against their recorded sha256 (its judge,
  `judge_for`, is read from the package too). Either is written once to `state/base/<name>/`
  as a normal diffusers folder (`StableDiffusionPipeline.save_pretrained` into a temporary
  sibling, fsynced, renamed); a local diffusers folder or a single-file `.safetensors`
  checkpoint is used in place. Nothing ever reaches a model hub.
- `register(journal, base)`: appends `BaseModelRegistered` once per sha256.
- `load_pipeline_components(base) -> (unet, vae, text_encoder, tokenizer, noise_scheduler)`.
- `clip_tokenizer()`: the real CLIP tokenizer (49,408 tokens) built from the BPE vocabulary
  that ships inside open_clip, no files needed, no hub.

`BaseModel.sha256` is a digest over the weight files only (`*.safetensors` relative path and
content hash, sorted), so it is the same on every machine for the builtin: configs carry the
library version and would change with an upgrade although the weights do not.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lora_service.models.torch_compat  # noqa: F401  (must precede transformers, diffusers)

# isort: split
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    load_single_file_checkpoint,
)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lora_service.errors import UsageError
from lora_service.journal import Journal, queries
from lora_service.journal.events import BaseModelRegistered
from lora_service.models import shapes_sd, tiny_sd
from lora_service.store import fsync_dir, fsync_tree, sha256_file

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("tiny-sd", "shapes-sd")
Kind = Literal["builtin", "diffusers", "single_file"]
# shipped diffusers-layout configs a single-file SD 1.x checkpoint is loaded against
SD15_CONFIG = Path(__file__).with_name("sd15")


@dataclass(frozen=True)
class BaseModel:
    spec: str  # as configured
    path: Path  # absolute: a diffusers folder or a .safetensors file
    kind: Kind
    sha256: str
    files: dict[str, str] = field(default_factory=dict)  # state-relative path -> sha256

    def relpath(self, state_dir: Path) -> str:
        """`path` relative to the state folder when inside it (the builtin), else absolute."""
        try:
            return self.path.relative_to(state_dir).as_posix()
        except ValueError:
            return str(self.path)


# -- the tokenizer --------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table (the BPE alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary and merges, exactly as open_clip's SimpleTokenizer builds them."""
    # the file is found without importing open_clip (2 s of torchvision and dynamo imports)
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations, "open_clip is installed"
    source = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    text = gzip.decompress(source.read_bytes()).decode("utf-8")
    merges = [tuple(line.split()) for line in text.split("\n")[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[misc]


def clip_tokenizer() -> Any:
    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# -- the builtin ----------------------------------------------------------------------------


def build_tiny_sd() -> Any:
    """The builtin pipeline, built from the shipped configs and a fixed seed (bit-identical)."""
    torch.manual_seed(tiny_sd.SEED)
    unet = UNet2DConditionModel(**tiny_sd.UNET)
    vae = AutoencoderKL(**tiny_sd.VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_sd.TEXT_ENCODER))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDPMScheduler(**tiny_sd.SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def shapes_text_encoder() -> Any:
    """`builtin:shapes-sd`'s frozen random text encoder, rebuilt from its seed."""
    torch.manual_seed(shapes_sd.SEED)
    return CLIPTextModel(CLIPTextConfig(**shapes_sd.TEXT_ENCODER)).eval()


def shipped(name: str, folder: Path = shapes_sd.WEIGHTS_DIR) -> Path:
    """A shipped weight file of `builtin:shapes-sd`, refused unless its sha256 is the one
    recorded in `shapes_sd.WEIGHTS`."""
    path = folder / name
    want = shapes_sd.WEIGHTS.get(name)
    if want is None or not path.is_file() or sha256_file(path) != want:
        raise UsageError(f"builtin:shapes-sd: {path} is missing or not the file that was "
                         "shipped (sha256 differs); reinstall lora-service")
    return path


def shapes_sd_modules(folder: Path = shapes_sd.WEIGHTS_DIR, *,
                      check: bool = True) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The pretrained UNet and VAE from fp16 safetensors (in fp32), built from the configs in
    `shapes_sd.py` (not from files beside the weights: only what is hash-checked decides)."""
    unet = UNet2DConditionModel(**shapes_sd.UNET)
    vae = AutoencoderKL(**{**shapes_sd.VAE, "scaling_factor": shapes_sd.SCALING_FACTOR})
    for name, module in (("unet", unet), ("vae", vae)):
        path = shipped(f"{name}.safetensors", folder) if check else folder / f"{name}.safetensors"
        module.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=True)
    return unet.eval(), vae.eval()


def judge_for(spec: str) -> Path | None:
    """The judge that ships with a base model (`builtin:shapes-sd`'s, sha256-checked), or None:
    a judge knows one world, and only a builtin's world is known."""
    return shipped("judge.safetensors") if spec == f"{BUILTIN_PREFIX}shapes-sd" else None


def build_shapes_sd() -> Any:
    """The pretrained builtin: shipped fp16 UNet and VAE, the text encoder rebuilt."""
    unet, vae = shapes_sd_modules()
    modules = {"unet": unet, "vae": vae}
    return StableDiffusionPipeline(
        vae=modules["vae"],
        text_encoder=shapes_text_encoder(),
        tokenizer=clip_tokenizer(),
        unet=modules["unet"],
        scheduler=DDPMScheduler(**shapes_sd.SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _write_builtin(name: str, target: Path) -> None:
    """Build into a temporary sibling and rename: the folder appears complete or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build = build_shapes_sd if name == "shapes-sd" else build_tiny_sd
    build().save_pretrained(tmp, safe_serialization=True)
    fsync_tree(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "model_index.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: same bytes
    fsync_dir(target.parent)


def weight_digest(root: Path) -> tuple[str, dict[str, str]]:
    """sha256 over the sorted (relative path, sha256) of every .safetensors file under root."""
    hashes = {
        p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*.safetensors"))
    }
    if not hashes:
        raise UsageError(f"{root}: no .safetensors weight files found")
    blob = "".join(f"{rel}\0{sha}\n" for rel, sha in sorted(hashes.items()))
    return hashlib.sha256(blob.encode()).hexdigest(), hashes


def materialise(spec: str, state_dir: Path) -> BaseModel:
    """Resolve the configured base model to files on disk (building the builtin once)."""
    state_dir = Path(state_dir)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTINS:
            raise UsageError(
                f"base_model: {spec!r} is not a builtin model (known: "
                + ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
                + ")"
            )
        target = state_dir / "base" / name
        if not (target / "model_index.json").exists():
            _write_builtin(name, target)
        digest, hashes = weight_digest(target)
        rel = target.relative_to(state_dir).as_posix()
        files = {f"{rel}/{k}": v for k, v in hashes.items()}
        return BaseModel(spec, target, "builtin", digest, files)
    path = Path(spec)
    if path.is_dir():
        if not (path / "model_index.json").exists() or not (path / "unet").is_dir():
            raise UsageError(
                f"base_model: {path} is not a diffusers folder (model_index.json and unet/ needed)"
            )
        digest, _ = weight_digest(path)
        return BaseModel(spec, path, "diffusers", digest)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UsageError(
                f"base_model: {path} must be a .safetensors single-file checkpoint "
                "(pickled .ckpt files are not loaded)"
            )
        return BaseModel(spec, path, "single_file", sha256_file(path))
    raise UsageError(
        f"base_model: {spec!r} not found (use builtin:shapes-sd, builtin:tiny-sd, a diffusers "
        "folder or a "
        ".safetensors file)"
    )


def register(journal: Journal, base: BaseModel) -> int | None:
    """Append `BaseModelRegistered` unless this sha256 is already registered; return its seq."""
    if queries.base_model(journal, base.sha256):
        return None
    state_dir = journal.path.parent
    event = BaseModelRegistered(
        spec=base.spec,
        sha256=base.sha256,
        path=base.relpath(state_dir),
        kind=base.kind,
        files=base.files,
    )
    return journal.append(event)[0]


# -- loading --------------------------------------------------------------------------------


def load_pipeline_components(base: BaseModel) -> tuple[Any, Any, Any, Any, Any]:
    """(unet, vae, text_encoder, tokenizer, noise_scheduler) in fp32, eval mode, on CPU."""
    if base.kind == "single_file":
        return _load_single_file(base.path)
    root = str(base.path)
    # local_files_only=True everywhere: nothing may reach a hub
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True)  # noqa: E501
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    return unet, vae, text_encoder, tokenizer, scheduler


def _load_single_file(path: Path) -> tuple[Any, Any, Any, Any, Any]:
    """A single-file SD 1.x checkpoint, each component against the shipped SD 1.5 configs
    (`models/sd15/`), the tokenizer from open_clip's vocabulary (SD 1.x uses CLIP's)."""
    cfg = str(SD15_CONFIG)
    kw: dict[str, Any] = {"local_files_only": True, "config": cfg}
    unet = UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kw)
    vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", **kw)
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    text_config = CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder", local_files_only=True)  # noqa: E501
    text_encoder = CLIPTextModel(text_config)
    state = convert_ldm_clip_checkpoint(checkpoint)
    result = text_encoder.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise UsageError(
            f"base_model: {path} is not an SD 1.x checkpoint (text encoder keys missing, e.g. "
            f"{missing[0]})"
        )
    scheduler = DDPMScheduler.from_pretrained(cfg, subfolder="scheduler", local_files_only=True)
    return unet, vae, text_encoder.eval(), clip_tokenizer(), scheduler
