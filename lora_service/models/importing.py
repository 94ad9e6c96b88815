"""Importing an adapter trained elsewhere: a kohya or peft LoRA becomes a lineage root.

Imports torch, peft and diffusers: only the import child (`python -m lora_service.training
--import-adapter FILE`, started by `lora-service import`) imports this module.

1. Read what the user gave (`read_origin`), once, into memory: its sha256 is of the bytes that
   were converted. Formats, detected from the keys when `--format` is not given:
   - kohya / WebUI: one `.safetensors` with `lora_unet_…`/`lora_te…` keys
     (`.lora_down.weight`, `.lora_up.weight`, `.alpha`);
   - peft: a folder with `adapter_config.json` and `adapter_model.safetensors` (ours may have
     `text_encoder/` beside them), or diffusers' `pytorch_lora_weights.safetensors` with
     `unet.`/`text_encoder.` keys (LoRA settings in its `lora_adapter_metadata`).
   Pickled files (.ckpt, .pt, .bin) are refused: loading them can run code.
2. Convert to peft tensors keyed by module path (`to_peft`): kohya keys go through diffusers'
   own `lora_state_dict` (its `_convert_non_diffusers_lora_to_diffusers`, what
   `load_lora_weights` uses), then `convert_unet_state_dict_to_peft` /
   `convert_state_dict_to_peft`, as diffusers' loaders do; `text_model.` is dropped for
   transformers' flattened CLIPTextModel as `diffusers.loaders.lora_base` does.
3. Check the geometry against the configured base model and `lora.*` (`check_geometry`): one
   rank and one alpha equal to the config's, the same modules the config's targets select (UNet,
   and the text encoder exactly when `lora.train_text_encoder`), every tensor the shape of the
   base model's layer. A mismatch is a UsageError naming the key and the values: nothing stored.
4. Store it as a version (`store_version`): `state/versions/vNNNN/` as a published one — the
   peft layout (fp32, what the next run loads), our kohya file, card.json, each with the journal
   witness — and journal `VersionImported` (no parent: a lineage root) with `HeadMoved` in one
   transaction, then deploy and render samples as after a run. The next run continues from it
   with the incremental learning rate and epochs (`daemon.plan`).

The import always becomes the head, whatever `train.promote` says: the gate keeps *automatic*
versions off the head until they prove themselves against their parent, and an import is neither
automatic nor has a parent to compare with; it is the user's explicit choice, like `promote`
and `rollback`, which bypass the gate too. `rollback` puts the previous head back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lora_service.models.torch_compat  # noqa: F401  (must precede peft/diffusers)

# isort: split
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load as tensors_from_safetensors  # never unpickles

from lora_service.config import Config
from lora_service.errors import ServiceError, UsageError
from lora_service.journal import Journal
from lora_service.journal.events import HeadMoved, ImportedGeometry, VersionImported
from lora_service.journal.sqlite import utc_now
from lora_service.logs import get_logger
from lora_service.models import adapters, base_model
from lora_service.models.render import render_samples
from lora_service.store import sha256_bytes
from lora_service.versions import witness
from lora_service.versions.heads import deploy
from lora_service.versions.publish import (
    ADAPTER_DIR,
    decide_on_head,
    kohya_name,
    new_version_folder,
    removed_on_failure,
    seal_version_folder,
)

Format = Literal["kohya", "peft"]
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # as `training.trainer` trains
Tensors = dict[str, torch.Tensor]
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' `LORA_ADAPTER_METADATA_KEY`


@dataclass
class Origin:
    """What the user gave, read once: the tensors and the bytes they came from."""

    name: str  # file or folder name only: journaled, so no local path
    format: Format
    weights: Tensors  # the main weights file's tensors, as stored
    metadata: dict[str, str]  # its safetensors metadata
    sha256: str  # of the main weights file
    files: dict[str, str] = field(default_factory=dict)  # name in the origin -> sha256
    config: dict[str, Any] | None = None  # a peft folder's adapter_config.json
    text_encoder: Tensors = field(default_factory=dict)  # a peft folder's text_encoder/
    text_encoder_config: dict[str, Any] | None = None


@dataclass
class Converted:
    """Peft tensors keyed by module path (`<module>.lora_A.weight`), with the alphas."""

    unet: Tensors
    text_encoder: Tensors
    alphas: set[float]  # one per module, as the origin states them (or implies: alpha = rank)


# -- reading ---------------------------------------------------------------------------------


def _safetensors(blob: bytes, name: str) -> tuple[Tensors, dict[str, str]]:
    """(tensors, metadata) of safetensors bytes; UsageError when they are not safetensors."""
    try:
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + size])
        tensors = tensors_from_safetensors(blob)
    except Exception as exc:  # noqa: BLE001  (any parse failure is the file's)
        raise UsageError(f"{name}: not a readable .safetensors file ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return tensors, {k: v for k, v in (meta or {}).items() if isinstance(v, str)}


def _read(path: Path) -> bytes:
    if not path.is_file():  # a FIFO or device would block or never end
        raise UsageError(f"{path.name}: not a regular file")
    return path.read_bytes()


def _peft_folder(
    folder: Path, name: str
) -> tuple[Tensors, dict[str, str], dict[str, str], dict[str, Any]]:
    """(tensors, metadata, {file name: sha256}, adapter config) of a peft folder."""
    weights = _read(folder / adapters.ADAPTER_WEIGHTS)
    tensors, meta = _safetensors(weights, f"{name}/{adapters.ADAPTER_WEIGHTS}")
    text = _read(folder / adapters.ADAPTER_CONFIG)
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{name}/{adapters.ADAPTER_CONFIG}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{name}/{adapters.ADAPTER_CONFIG}: not a JSON object")
    files = {adapters.ADAPTER_WEIGHTS: sha256_bytes(weights),
             adapters.ADAPTER_CONFIG: sha256_bytes(text)}
    return tensors, meta, files, config


def _kind(keys: list[str]) -> str | None:
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    if keys and all(k.startswith(adapters.PEFT_PREFIX) for k in keys):
        return "peft"
    return None


def read_origin(path: Path, fmt: Format | None = None) -> Origin:
    """Read a kohya file, a peft folder or a diffusers LoRA file (see the module docstring);
    `fmt`, when given, must be what the keys say. UsageError says what is wrong with it."""
    path = Path(path)
    name = path.name
    if path.is_file() and path.name == adapters.ADAPTER_WEIGHTS and (
        path.parent / adapters.ADAPTER_CONFIG
    ).is_file():
        path, name = path.parent, path.parent.name  # the peft weights file: read its folder
    if path.is_dir():
        if not ((path / adapters.ADAPTER_CONFIG).is_file()
                and (path / adapters.ADAPTER_WEIGHTS).is_file()):
            raise UsageError(
                f"{name}: a folder must be a peft adapter ({adapters.ADAPTER_CONFIG} and "
                f"{adapters.ADAPTER_WEIGHTS}); a kohya or diffusers LoRA is one .safetensors file"
            )
        detected: Format = "peft"
        tensors, meta, files, config = _peft_folder(path, name)
        origin = Origin(name, "peft", tensors, meta, files[adapters.ADAPTER_WEIGHTS], files,
                        config=config)
        te = path / adapters.TEXT_ENCODER_DIR
        if (te / adapters.ADAPTER_WEIGHTS).is_file():  # our own peft layout's text encoder
            te_name = f"{name}/{adapters.TEXT_ENCODER_DIR}"
            origin.text_encoder, _, te_files, origin.text_encoder_config = _peft_folder(
                te, te_name)
            origin.files |= {f"{adapters.TEXT_ENCODER_DIR}/{k}": v for k, v in te_files.items()}
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise UsageError(
                f"{name}: only .safetensors files are imported (a pickled .ckpt, .pt or .bin "
                "can run code when loaded)"
            )
        blob = _read(path)
        tensors, meta = _safetensors(blob, name)
        kind = _kind(list(tensors))
        if kind is None or kind == "peft":
            first = next(iter(sorted(tensors)), "(none)")
            raise UsageError(
                f"{name}: not a LoRA this service reads: kohya keys start lora_unet_/lora_te, "
                f"diffusers keys unet./text_encoder. (first key: {first})"
                + (f"; a peft adapter is read from its folder, with {adapters.ADAPTER_CONFIG}"
                   if kind == "peft" else "")
            )
        detected = "kohya" if kind == "kohya" else "peft"
        sha = sha256_bytes(blob)
        origin = Origin(name, detected, tensors, meta, sha, files={name: sha})
    else:
        raise UsageError(f"{name}: not a file or folder")
    if fmt is not None and fmt != detected:
        raise UsageError(f"--format {fmt}, but {name} holds a {detected} adapter")
    return origin


# -- converting ------------------------------------------------------------------------------


def _te_to_peft(state: Tensors, text_encoder: torch.nn.Module) -> Tensors:
    """Text-encoder LoRA in diffusers' naming -> peft keys of *our* CLIPTextModel, the way
    `diffusers.loaders.lora_base._load_lora_into_text_encoder` converts it."""
    if not state:
        return {}
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(text_encoder, "text_model"):  # transformers 5 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def _split(state: Tensors, name: str) -> tuple[Tensors, Tensors]:
    """`unet.`/`text_encoder.` keys -> (unet, text encoder) without the prefix."""
    unet, te = {}, {}
    for key, value in state.items():
        if key.startswith("unet."):
            unet[key.removeprefix("unet.")] = value
        elif key.startswith("text_encoder."):
            te[key.removeprefix("text_encoder.")] = value
        else:
            raise UsageError(f"{name}: key {key} is neither UNet nor text encoder (an SDXL or "
                             "other model's LoRA?); the base model is SD 1.x")
    return unet, te


def _kohya_to_diffusers(origin: Origin) -> tuple[Tensors, set[float]]:
    weights = origin.weights
    odd = sorted(k for k in weights if not k.endswith(KOHYA_SUFFIXES))
    if odd:
        raise UsageError(
            f"{origin.name}: key {odd[0]} is not plain LoRA (lora_down/lora_up/alpha); "
            "LyCORIS, LoHa, LoKr and DoRA adapters are not imported"
        )
    second = sorted(k for k in weights if k.startswith("lora_te2_"))
    if second:
        raise UsageError(f"{origin.name}: has a second text encoder's LoRA ({second[0]}): an "
                         "SDXL adapter; the base model is SD 1.x")
    alphas = set()
    for key, value in weights.items():
        if key.endswith(".lora_down.weight"):
            alpha_key = key.removesuffix(".lora_down.weight") + ".alpha"
            alpha = weights.get(alpha_key)
            if alpha is not None and alpha.numel() != 1:
                raise UsageError(f"{origin.name}: {alpha_key} is not one number")
            # kohya's LoRAModule: no alpha (or 0) means alpha = rank (sd-scripts networks/lora.py)
            stated = float(alpha.reshape(-1)[0]) if alpha is not None else 0.0
            alphas.add(stated or float(value.shape[0]))
    try:
        state, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(weights))
    except (ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[-1][:200]
        raise UsageError(f"{origin.name}: kohya keys diffusers cannot map ({first})") from None
    return state, alphas


def _diffusers_alphas(origin: Origin, ranks: set[int]) -> set[float]:
    """A diffusers file's alpha: `<component>.lora_alpha` in its `lora_adapter_metadata`, else
    alpha = rank, diffusers' own default when a file states none."""
    try:
        meta = json.loads(origin.metadata.get(DIFFUSERS_METADATA, "{}"))
    except ValueError:
        meta = {}
    _refuse_variants(origin.name, {k.split(".", 1)[-1]: v for k, v in meta.items()})
    alphas = {float(v) for k, v in meta.items() if k.endswith(".lora_alpha") and v is not None}
    return alphas or {float(r) for r in ranks}


def _refuse_variants(name: str, config: dict[str, Any]) -> None:
    """DoRA, rsLoRA and per-module patterns change what the tensors mean: refused."""
    if config.get("use_dora"):
        raise UsageError(f"{name}: use_dora is set: a DoRA adapter, not plain LoRA")
    if config.get("use_rslora"):
        raise UsageError(f"{name}: use_rslora is set (scale alpha/sqrt(rank)); lora-service "
                         "trains plain LoRA (alpha/rank)")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise UsageError(f"{name}: rank_pattern/alpha_pattern give modules their own rank or "
                         "alpha; lora-service trains one rank and one alpha")


def to_peft(origin: Origin, text_encoder: torch.nn.Module) -> Converted:
    """The origin's LoRA as peft tensors for our UNet and text encoder (see module docstring)."""
    if origin.config is not None:  # a peft folder: keys are module paths already
        _refuse_variants(origin.name, origin.config)
        unet = {k.removeprefix(adapters.PEFT_PREFIX): v for k, v in origin.weights.items()}
        te = {k.removeprefix(adapters.PEFT_PREFIX): v for k, v in origin.text_encoder.items()}
        alphas = {float(origin.config.get("lora_alpha", 8))}
        if origin.text_encoder_config is not None:
            _refuse_variants(origin.name, origin.text_encoder_config)
            alphas.add(float(origin.text_encoder_config.get("lora_alpha", 8)))
        te = _te_to_peft(te, text_encoder) if te else {}
    else:
        if origin.format == "kohya":
            state, alphas = _kohya_to_diffusers(origin)
        else:
            state = dict(origin.weights)
            alphas = set()
        unet, te = _split(state, origin.name)
        unet = convert_unet_state_dict_to_peft(unet) if unet else {}
        te = _te_to_peft(te, text_encoder)
        if origin.format == "peft":
            ranks = {int(v.shape[0]) for k, v in {**unet, **te}.items() if ".lora_A." in k}
            alphas = _diffusers_alphas(origin, ranks)
    odd = sorted(k for k in [*unet, *te] if not k.endswith(PEFT_SUFFIXES))
    if odd:
        raise UsageError(f"{origin.name}: key {odd[0]} is not plain LoRA (lora_A/lora_B); "
                         "DoRA and other variants are not imported")
    return Converted(unet, te, alphas)


# -- checking --------------------------------------------------------------------------------


def _show(values: Any) -> str:
    if isinstance(values, float):
        return f"{values:g}"
    return ",".join(sorted(str(v) for v in values))


def _modules(state: Tensors, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (lora_A, lora_B); each module needs both."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, part = key.rsplit(".lora_", 1)
        out.setdefault(module, {})[part.split(".", 1)[0]] = value
    for module, parts in out.items():
        if set(parts) != {"A", "B"}:
            raise UsageError(f"{name}: {module} has lora_{''.join(parts)} only, not both halves")
    return {m: (p["A"], p["B"]) for m, p in out.items()}


def _target(module: str) -> str:
    """The target name a module path answers to: `…attn1.to_out.0` -> `to_out.0`."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _compare(
    name: str,
    have: dict[str, tuple[torch.Tensor, torch.Tensor]],
    model: torch.nn.Module,
    selects: str,
    fix: str,
) -> None:
    """The file's modules against the ones `model`'s adapter (from the config) has; `selects`
    says which modules the adapter has, `fix` what the user can do about a difference."""
    want = _modules(adapters.peft_state_dict(model), "model")
    extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
    layers = dict(model.named_modules())
    foreign = [m for m in extra if m not in layers]
    if foreign:
        raise UsageError(
            f"base_model: {name} adapts {len(foreign)} module(s) the base model does not have "
            f"(e.g. {foreign[0]}): it was trained for another model"
        )
    if extra or missing:
        raise UsageError(
            f"{selects} but {name} adapts {_show({_target(m) for m in have})} ({len(extra)} "
            f"module(s) more, {len(missing)} fewer); {fix}"
        )
    for module, (a, b) in sorted(have.items()):
        wa, wb = want[module]
        if a.shape != wa.shape or b.shape != wb.shape:
            raise UsageError(
                f"base_model: {name}'s {module} maps {a.shape[1]} -> {b.shape[0]} features, the "
                f"base model's layer {wa.shape[1]} -> {wb.shape[0]}: it was trained on another "
                "base model"
            )


def check_geometry(
    origin: Origin,
    converted: Converted,
    config: Config,
    base_sha256: str,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
) -> ImportedGeometry:
    """Refuse (UsageError, one line naming the key) an adapter that does not fit the configured
    base model and `lora.*`. Adds the config's adapter to `unet` (and `text_encoder` when it
    trains) to compare against, as a run would build it."""
    lora, name = config.lora, origin.name
    claimed = origin.metadata.get("lora_service_base_sha256")  # our own files say their base
    if claimed and claimed != base_sha256:
        raise UsageError(
            f"base_model: {name} was trained on base sha256 {claimed[:12]}, the configured "
            f"base model ({config.base_model}) is {base_sha256[:12]}"
        )
    unet_mods = _modules(converted.unet, name)
    te_mods = _modules(converted.text_encoder, name)
    if not unet_mods:
        raise UsageError(f"{name}: holds no UNet LoRA")
    ranks = {int(a.shape[0]) for a, _ in [*unet_mods.values(), *te_mods.values()]}
    if len(ranks) > 1:
        raise UsageError(f"{name}: its modules have different ranks ({_show(ranks)}); "
                         "lora-service trains one rank")
    (rank,) = ranks
    if rank != lora.rank:
        raise UsageError(f"lora.rank is {lora.rank} but {name} has rank {rank}; set "
                         f"lora.rank: {rank} to import it")
    if len(converted.alphas) > 1:
        raise UsageError(f"{name}: its modules have different alphas "
                         f"({_show(converted.alphas)}); lora-service trains one alpha")
    (alpha,) = converted.alphas
    if not math.isclose(alpha, lora.alpha, rel_tol=1e-6):
        raise UsageError(f"lora.alpha is {lora.alpha:g} but {name} has alpha {alpha:g}; set "
                         f"lora.alpha: {alpha:g} to import it")
    if bool(te_mods) != lora.train_text_encoder:
        has = f"has text-encoder LoRA ({len(te_mods)} modules)" if te_mods else (
            "has no text-encoder LoRA")
        raise UsageError(f"lora.train_text_encoder is {str(lora.train_text_encoder).lower()} "
                         f"but {name} {has}; set lora.train_text_encoder: "
                         f"{str(bool(te_mods)).lower()} to import it")
    unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                target_modules=list(lora.target_modules)))
    _compare(name, unet_mods, unet, f"lora.target_modules is {_show(lora.target_modules)}",
             "set lora.target_modules to match")
    if te_mods:
        text_encoder.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                            target_modules=list(TEXT_TARGETS)))
        _compare(name, te_mods, text_encoder,
                 f"lora-service trains the text encoder's {_show(TEXT_TARGETS)}",
                 "such an adapter cannot be imported")
    return ImportedGeometry(rank=rank, alpha=float(lora.alpha),
                            target_modules=tuple(lora.target_modules),
                            train_text_encoder=bool(te_mods))


def load_into(model: torch.nn.Module, state: Tensors) -> None:
    """Set the adapter's tensors (fp32, as a run trains them); every LoRA parameter must be
    set and every tensor used."""
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=adapters.ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or []
               if "lora_" in k and f".{adapters.ADAPTER_NAME}." in k]
    if unexpected or missing:  # the geometry check makes this unreachable; never store half
        raise UsageError(f"the adapter does not fit the model: unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]}")


# -- storing ---------------------------------------------------------------------------------


def kohya_metadata(origin: Origin, version: str, name: str, geometry: ImportedGeometry,
                   base_sha256: str, seq: int, digest: str) -> dict[str, str]:
    """The stored kohya file's metadata: the origin's own `ss_*`/`modelspec.*` (what its
    trainer recorded about its training), then the facts of this file and where it came from.
    The origin's `lora_service_*` keys describe another state's journal and are dropped."""
    kept = {k: v for k, v in origin.metadata.items() if k.startswith(("ss_", "modelspec."))}
    return {
        **kept,
        "ss_output_name": name,  # the deploy name: a WebUI alias keeps resolving
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(geometry.rank),
        "ss_network_alpha": str(float(geometry.alpha)),
        "lora_service_base_sha256": base_sha256,
        "lora_service_imported_from": origin.name,
        "lora_service_imported_format": origin.format,
        "lora_service_imported_sha256": origin.sha256,
        "lora_service_parent": "",
        **witness.metadata(version, seq, digest),
    }


def store_version(
    journal: Journal,
    config: Config,
    origin: Origin,
    geometry: ImportedGeometry,
    base_sha256: str,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    modules: int,
) -> tuple[str, str | None]:
    """Write `state/versions/vNNNN/` (whole or not at all, as `publish_version` does), journal
    `VersionImported` and `HeadMoved`, deploy; return (version, previous head)."""
    version, rel, final, tmp = new_version_folder(journal, config.paths.state)
    seq, digest = journal.position()
    kohya = kohya_name(config, version)
    te = text_encoder if geometry.train_text_encoder else None
    with removed_on_failure(tmp):
        adapter = adapters.TrainedAdapter(unet, te)
        written = adapter.write_peft(tmp / ADAPTER_DIR, witness.metadata(version, seq, digest))
        files = {f"{ADAPTER_DIR}/{k}": v for k, v in written.items()}
        meta = kohya_metadata(origin, version, config.name, geometry, base_sha256, seq, digest)
        files[kohya] = adapter.write_kohya(tmp / kohya, geometry.alpha, meta)
        card = {
            "version": version,
            "parent": None,
            "run_id": None,
            "imported": {"origin": origin.name, "format": origin.format,
                         "sha256": origin.sha256, "origin_files": origin.files,
                         "metadata": origin.metadata},
            "batches": [],
            "new_batches": [],
            "images": 0,
            "step": 0,
            "steps": 0,
            "base_sha256": base_sha256,
            "lora": geometry.model_dump(mode="json"),
            "files": dict(sorted(files.items())),
            "created_at": utc_now(),
            "journal_seq": seq,
            "journal_hash": digest,
        }
        seal_version_folder(tmp, final, card, files)
    imported = VersionImported(
        files={f"{rel}/{k}": v for k, v in sorted(files.items())},
        version=version, origin=origin.name, format=origin.format, sha256=origin.sha256,
        origin_files=origin.files, geometry=geometry, modules=modules,
        base_sha256=base_sha256,
    )
    _, moved = decide_on_head(journal, version, lambda previous: (imported, HeadMoved(
        version=version, previous=previous, by="promote",
        reason=f"imported {origin.name} ({origin.format}, sha256 {origin.sha256[:12]}): "
               "a new lineage root")))
    return version, moved.previous


def import_adapter(journal: Journal, config: Config, path: Path,
                   fmt: Format | None = None) -> dict[str, Any]:
    """Read, convert, check and store `path` (see the module docstring); return a summary
    (version, previous head, origin, format, sha256, rank, alpha, modules). The caller holds
    the state lock."""
    origin = read_origin(path, fmt)  # before the slow loads: a wrong file fails fast
    state = config.paths.state
    base = base_model.materialise(config.base_model, state)
    unet, vae, text_encoder, tokenizer, scheduler = base_model.load_pipeline_components(base)
    converted = to_peft(origin, text_encoder)
    geometry = check_geometry(origin, converted, config, base.sha256, unet, text_encoder)
    load_into(unet, converted.unet)
    if geometry.train_text_encoder:
        load_into(text_encoder, converted.text_encoder)
    modules = (len(converted.unet) + len(converted.text_encoder)) // 2
    base_model.register(journal, base)  # only now: a refused import journals nothing
    version, previous = store_version(journal, config, origin, geometry, base.sha256, unet,
                                      text_encoder, modules)
    try:
        deploy(journal, config, version)
    except ServiceError as exc:  # the version and the head stand; the next head move deploys
        get_logger("lora_service.versions").warning("deploy failed", error=str(exc))
    if config.samples.enabled:  # never fails the import: render_samples journals its errors
        render_samples(journal, config, version, unet=unet, text_encoder=text_encoder, vae=vae,
                       tokenizer=tokenizer, scheduler=scheduler)
    return {
        "version": version, "previous_head": previous, "origin": origin.name,
        "format": origin.format, "sha256": origin.sha256, "rank": geometry.rank,
        "alpha": geometry.alpha, "text_encoder": geometry.train_text_encoder,
        "modules": modules,
    }
