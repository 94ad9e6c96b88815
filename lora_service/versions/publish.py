"""Publishing a version: its folder, its journal record and the gate's verdict (torch-free).

`publish_version` is the end of a training run: the training child calls it with the trained
adapter as an `AdapterFiles` (`models.adapters.TrainedAdapter`), which writes the tensors; this
module decides everything else. Moving the head by hand and deploying: `versions.heads`;
copying a stored version out: `versions.export`.

A version folder, `state/versions/vNNNN/`, appears whole or not at all: it is built under a
temporary sibling name (`.vNNNN.tmp-<pid>`), every file fsynced, then renamed. Its contents:

- `adapter/`: the peft layout (`models.adapters`), what the next run starts from;
- `<config.name>-vNNNN.safetensors`: the kohya/WebUI file with `ss_*` metadata;
- `card.json`: the version's record (parent, batches, images, steps, losses, effective
  config, seed, base sha256, the other files' sha256, the image manifest). Like the kohya
  file it may travel, so its config is `config.shareable_config` (no local paths); the
  journal's `RunStarted` keeps the config as run.

Each of them carries the journal witness (`versions.witness`): the seq and hash of the last
event before the version was decided, which `verify --witness` checks against the chain.

The journal then gets `VersionCreated` (its `files` holds every file's sha256) and, in the
same transaction, the gate's verdict: `HeadMoved(by="promotion")` or `VersionHeld`.

Deploy: whenever the head moves and `paths.deploy_dir` is set, the head's kohya file is copied
atomically to `deploy_dir/<config.name>.safetensors` and `VersionExported(kind="deploy")` is
journaled. One fixed name, on purpose: a WebUI prompt's `<lora:NAME:1>` keeps pointing at the
head across promotions and rollbacks, and the folder does not grow with every version (each
version's own file stays in its version folder, and `export` writes it anywhere). Every kohya
file's `ss_output_name` is that fixed name too (WebUI's alias for the LoRA, so the alias keeps
resolving after the head moves); `lora_service_version` and `modelspec.title` say which version
it is.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lora_service.config import Config, shareable_config
from lora_service.errors import ServiceError
from lora_service.journal import Journal, queries
from lora_service.journal.events import HeadMoved, VersionCreated, VersionHeld
from lora_service.journal.sqlite import utc_now
from lora_service.logs import get_logger
from lora_service.store import atomic_writer, fsync_dir, fsync_tree, sha256_file
from lora_service.versions import metadata, witness
from lora_service.versions.gate import decide, worse_batches
from lora_service.versions.heads import decide_on_head, deploy, version_files, version_row
from lora_service.versions.verify import kohya_file, version_dir

# a version folder's layout (see the module docstring); the peft names are peft's own
ADAPTER_DIR = "adapter"
CARD = "card.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TEXT_ENCODER_DIR = "text_encoder"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module paths
ADAPTER_NAME = "default"


class AdapterFiles(Protocol):
    """A trained adapter that can write itself (the torch side implements it)."""

    @property
    def has_text_encoder(self) -> bool: ...

    def write_peft(self, folder: Path, metadata: dict[str, str]) -> dict[str, str]:
        """The peft layout into `folder`: {path in folder: sha256}."""
        ...

    def write_kohya(self, path: Path, alpha: float, metadata: dict[str, str]) -> str:
        """The kohya file (configured alpha, this metadata) at `path`: its sha256."""
        ...


@dataclass(frozen=True)
class Measured:
    """What a finished run measured, as the version's record keeps it.

    `step` is the global step at the end (the parent's step + this run's `steps`); `manifest`
    maps every image and caption file trained on (path relative to the state folder) to its
    sha256; `parent_val_loss_per_batch` is the parent measured on the same images as
    `val_loss_per_batch`; `validation_images` goes into the kohya metadata."""

    step: int
    steps: int
    epochs: int
    images: int
    manifest: dict[str, str]
    started_at: str
    finished_at: str
    train_loss: float | None = None
    val_loss: float | None = None
    val_loss_known: float | None = None
    parent_val_loss_known: float | None = None
    val_loss_per_batch: dict[str, float] = field(default_factory=dict)
    parent_val_loss_per_batch: dict[str, float] = field(default_factory=dict)
    validation_images: int | None = None


# -- reading the journal ---------------------------------------------------------------------


def next_version_name(journal: Journal) -> str:
    return f"v{len(queries.version_names(journal)) + 1:04d}"


def kohya_name(config: Config, version: str) -> str:
    return f"{config.name}-{version}.safetensors"


def recorded_config(run: dict[str, Any]) -> dict[str, Any]:
    """The one authority on what governs a run: its recorded effective config (`RunStarted`),
    never today's file, which may have changed since the run was planned."""
    recorded = json.loads(run["config"] or "{}")
    if not recorded:
        raise ServiceError(f"run {run['run_id']}: no recorded config in its RunStarted")
    return recorded


def _captions(journal: Journal, manifest: dict[str, str]) -> dict[str, list[str]]:
    """Captions of the images trained on, per batch name, matched by image sha256 (so the
    manifest's path convention does not matter; caption files simply match nothing)."""
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for row in queries.captions_by_image(journal, sorted(set(manifest.values()))):
        if row["sha256"] in seen:
            continue  # the same image in two batches is trained once
        seen.add(row["sha256"])
        out.setdefault(row["name"] or row["batch_id"], []).append(row["caption"] or "")
    return out


def _base_hashes(journal: Journal, state: Path, sha256: str) -> dict[str, str]:
    """The base model's `ss_sd_model_hash`/`ss_new_sd_model_hash` (`metadata.sd_model_hashes`),
    from its `BaseModelRegistered`: both for a single-file base, none for a folder or the
    builtin (or a base the journal does not know)."""
    row = queries.base_model(journal, sha256)
    if row is None:
        return {}
    path = Path(row["path"]) if row["path"] else None
    if path is not None and not path.is_absolute():
        path = state / path
    return metadata.sd_model_hashes(row["kind"], path, sha256)


# -- the version folder ----------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> str:
    blob = (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    with atomic_writer(path) as fh:
        fh.write(blob)
    return sha256_file(path)


def new_version_folder(journal: Journal, state: Path) -> tuple[str, str, Path, Path]:
    """(next version name, its state-relative folder, that folder, a fresh empty temp sibling
    to build it in): a version appears whole, by one rename, or not at all."""
    version = next_version_name(journal)
    folder_rel = version_dir(version)
    final = state / folder_rel
    tmp = final.with_name(f".{version}.tmp-{os.getpid()}")
    if final.exists():
        if queries.files_under(journal, folder_rel):
            raise ServiceError(f"{final}: exists and is journaled; versions table out of step")
        # a folder no event points at: an earlier attempt died between rename and append
        shutil.rmtree(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return version, folder_rel, final, tmp


@contextmanager
def removed_on_failure(tmp: Path) -> Iterator[None]:
    """Building a version in `tmp`: on any failure the temp folder goes, so a version appears
    whole (`seal_version_folder`) or leaves nothing."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seal_version_folder(tmp: Path, final: Path, card: dict[str, Any],
                        files: dict[str, str]) -> None:
    """Write `card.json` (its sha256 into `files`), fsync the folder and rename it into place:
    the version appears whole."""
    files[CARD] = _write_json(tmp / CARD, card)
    fsync_tree(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


# -- publishing ------------------------------------------------------------------------------


def publish_version(
    journal: Journal, config: Config, run_id: str, adapter: AdapterFiles, measured: Measured
) -> str:
    """Write `state/versions/vNNNN/`, journal it and the gate's verdict, deploy if promoted;
    return the version name. A run that already published returns its version unchanged.

    Everything that governs the version — LoRA alpha, `train.promote`, its tolerance, the base
    model — comes from the run's recorded config (`recorded_config`). The gate
    (`versions.gate.decide`) compares per batch the parent knew and pooled; a version whose
    parent is no longer the head (someone moved it while the run trained) is held rather than
    undoing that move. The verdict is appended with the position it was read at, so a head
    move that lands in between makes it decide again instead of both winning."""
    run = queries.run(journal, run_id)
    if run is None:
        raise ServiceError(f"run {run_id}: not in the journal (no RunStarted)")
    if run["version"]:
        return str(run["version"])
    effective = recorded_config(run)
    m = measured
    parent: str | None = run["parent"]
    new_batches: list[str] = json.loads(run["batches"] or "[]")
    rehearsal: list[str] = json.loads(run["rehearsal"] or "[]")
    batches = list(dict.fromkeys(new_batches + rehearsal))
    parent_per_batch = dict(sorted(m.parent_val_loss_per_batch.items()))
    unchecked = _unchecked(journal, parent, batches, m.val_loss_per_batch)
    tolerance = float(effective["train"]["promote_tolerance"])

    state = config.paths.state
    version, folder_rel, final, tmp = new_version_folder(journal, state)
    parent_sha = None
    if parent is not None:
        parent_files = version_files(version_row(journal, parent))
        parent_sha = parent_files.get(kohya_file(parent, parent_files))
    # the witness: the position this version is decided on (its VersionCreated, which records
    # these files' sha256, cannot be in them)
    last_seq, last_hash = journal.position()
    kohya = kohya_name(config, version)
    with removed_on_failure(tmp):
        adapter_files = adapter.write_peft(
            tmp / ADAPTER_DIR, witness.metadata(version, last_seq, last_hash)
        )
        kohya_metadata = metadata.ss_metadata(
            output_name=config.name,
            title=kohya.removesuffix(".safetensors"),
            version=version,
            parent=parent,
            parent_sha256=parent_sha,
            run_id=run_id,
            effective_config=effective,
            base_sha256=run["base_sha256"],
            base_model=str(effective["base_model"]),
            learning_rate=run["learning_rate"],
            step=m.step,
            steps=m.steps,
            epochs=m.epochs,
            images=m.images,
            seed=run["seed"],
            captions=_captions(journal, m.manifest),
            manifest=m.manifest,
            started_at=m.started_at,
            finished_at=m.finished_at,
            journal_seq=last_seq,
            journal_hash=last_hash,
            text_encoder=adapter.has_text_encoder,
            sd_model_hashes=_base_hashes(journal, state, run["base_sha256"]),
            validation_images=m.validation_images,
        )
        files = {f"{ADAPTER_DIR}/{k}": v for k, v in adapter_files.items()}
        files[kohya] = adapter.write_kohya(
            tmp / kohya, float(effective["lora"]["alpha"]), kohya_metadata
        )
        card = {
            "version": version,
            "parent": parent,
            "run_id": run_id,
            "batches": batches,
            "new_batches": new_batches,
            "rehearsal": rehearsal,
            "images": m.images,
            "steps": m.steps,
            "step": m.step,
            "start_step": run["start_step"],
            "epochs": m.epochs,
            "learning_rate": run["learning_rate"],
            "seed": run["seed"],
            "threads": run["threads"],
            "train_loss": m.train_loss,
            "val_loss": m.val_loss,
            "val_loss_per_batch": m.val_loss_per_batch,
            "val_loss_known": m.val_loss_known,
            "parent_val_loss_known": m.parent_val_loss_known,
            "parent_val_loss_per_batch": parent_per_batch,
            "worse_batches": worse_batches(tolerance, m.val_loss_per_batch, parent_per_batch),
            "unchecked_batches": unchecked,
            "base_sha256": run["base_sha256"],
            "lora": effective["lora"],
            "config": shareable_config(effective),
            "manifest": m.manifest,
            "files": dict(sorted(files.items())),
            "parent_kohya_sha256": parent_sha,
            "started_at": m.started_at,
            "finished_at": m.finished_at,
            "created_at": utc_now(),
            "journal_seq": last_seq,
            "journal_hash": last_hash,
        }
        seal_version_folder(tmp, final, card, files)

    created = VersionCreated(
        files={f"{folder_rel}/{rel}": sha for rel, sha in sorted(files.items())},
        version=version,
        run_id=run_id,
        parent=parent,
        batches=tuple(batches),
        new_batches=tuple(new_batches),
        images=m.images,
        step=m.step,
        steps=m.steps,
        train_loss=m.train_loss,
        val_loss=m.val_loss,
        val_loss_per_batch=m.val_loss_per_batch,
        val_loss_known=m.val_loss_known,
        base_sha256=run["base_sha256"],
    )
    mode = str(effective["train"]["promote"])
    _, verdict = decide_on_head(journal, version, lambda current: (created, _verdict(
        version, parent, current, mode, tolerance, m.val_loss_known, m.parent_val_loss_known,
        per_batch=m.val_loss_per_batch, parent_per_batch=parent_per_batch, unchecked=unchecked,
    )))
    if isinstance(verdict, HeadMoved):
        try:
            deploy(journal, config, version)
        except ServiceError as exc:
            # the version and the head stand; the next head change deploys again
            get_logger("lora_service.versions").warning("deploy failed", error=str(exc))
    return version


def _verdict(
    version: str,
    parent: str | None,
    current: str | None,
    mode: str,
    tolerance: float,
    known: float | None,
    parent_known: float | None,
    *,
    per_batch: dict[str, float],
    parent_per_batch: dict[str, float],
    unchecked: list[str],
) -> HeadMoved | VersionHeld:
    """The gate's event for a new version; a parent that is no longer the head holds it."""
    promote, reason = decide(mode, tolerance, known, parent_known, per_batch=per_batch,
                             parent_per_batch=parent_per_batch, unchecked=unchecked)
    if promote and parent is not None and current != parent:
        promote = False
        reason = (
            f"held: the head moved to {current} while this run trained from {parent}; "
            f"`lora-service promote {version}` to use it anyway"
        )
    if promote:
        return HeadMoved(version=version, previous=current, reason=reason, by="promotion")
    return VersionHeld(
        version=version,
        parent=parent,
        val_loss_known=known,
        parent_val_loss_known=parent_known,
        tolerance=tolerance,
        reason=reason,
        worse_batches=tuple(worse_batches(tolerance, per_batch, parent_per_batch)),
        parent_val_loss_per_batch=parent_per_batch,
        unchecked_batches=tuple(unchecked),
    )


def _unchecked(
    journal: Journal, parent: str | None, batches: list[str], per_batch: dict[str, float]
) -> list[str]:
    """Batches this version stands for (its parent's lineage and its own) that have no
    validation loss: no held-out image, so no gate ever compares them."""
    known = queries.batches_of(journal, queries.lineage(journal, parent))
    return sorted(b for b in {*known, *batches} if b not in per_batch)
