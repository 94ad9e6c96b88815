"""Versions: publishing a trained adapter, moving the head, deploying and exporting.

`publish_version` is the end of a training run (the training child calls it); `move_head`
serves `rollback` and `promote`; `export_version` serves `export`. Only `publish_version`
needs torch, and imports it (through `versions.export`) when called, so the CLI and the daemon
can import this module.

A version folder, `state/versions/vNNNN/`, appears whole or not at all: it is built under a
temporary sibling name (`.vNNNN.tmp-<pid>`), every file fsynced, then renamed. Its contents:

- `adapter/`: the peft layout (`versions.export.write_peft`), what the next run starts from;
- `<config.name>-vNNNN.safetensors`: the kohya/WebUI file with `ss_*` metadata;
- `card.json`: the version's record (parent, batches, images, steps, losses, effective
  config, seed, base sha256, the other files' sha256, the image manifest). Like the kohya
  file it may travel, so its config is `export.shareable_config` (no local paths); the
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lora_service.config import Config
from lora_service.errors import ServiceError, UsageError
from lora_service.journal import Journal, queries
from lora_service.journal.events import HeadMoved, VersionCreated, VersionExported, VersionHeld
from lora_service.journal.sqlite import utc_now
from lora_service.logs import get_logger
from lora_service.store import atomic_copy, atomic_writer, fsync_dir, fsync_tree, sha256_file
from lora_service.versions import witness
from lora_service.versions.gate import decide, worse_batches
from lora_service.versions.verify import kohya_file, verify_version_files, version_dir

if TYPE_CHECKING:
    import torch

ADAPTER_DIR = "adapter"
CARD = "card.json"


# -- reading the journal ---------------------------------------------------------------------


def _one(journal: Journal, sql: str, params: Any) -> dict[str, Any] | None:
    rows = journal.query(sql, params)
    return rows[0] if rows else None


def head(journal: Journal) -> str | None:
    row = _one(journal, "SELECT version FROM head WHERE id = 1", ())
    return row["version"] if row else None


def version_row(journal: Journal, version: str) -> dict[str, Any]:
    """The `versions` row, or UsageError naming the known versions."""
    row = _one(journal, "SELECT * FROM versions WHERE version = ?", [version])
    if row is None:
        known = [r["version"] for r in journal.query("SELECT version FROM versions ORDER BY 1")]
        listed = ", ".join(known[-8:]) if known else "none yet"
        raise UsageError(f"{version}: no such version (known: {listed})")
    return row


def version_files(row: dict[str, Any]) -> dict[str, str]:
    return json.loads(row["files"] or "{}")


def next_version_name(journal: Journal) -> str:
    count = _one(journal, "SELECT count(*) AS n FROM versions", ())
    return f"v{(count['n'] if count else 0) + 1:04d}"


def kohya_name(config: Config, version: str) -> str:
    return f"{config.name}-{version}.safetensors"


def _captions(journal: Journal, manifest: dict[str, str]) -> dict[str, list[str]]:
    """Captions of the images trained on, per batch name, matched by image sha256 (so the
    manifest's path convention does not matter; caption files simply match nothing)."""
    shas = sorted(set(manifest.values()))
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for start in range(0, len(shas), 500):
        chunk = shas[start : start + 500]
        rows = journal.query(
            "SELECT b.name AS name, i.batch_id AS batch_id, i.sha256 AS sha256, i.caption AS"
            " caption FROM batch_images i LEFT JOIN batches b ON b.batch_id = i.batch_id"
            f" WHERE i.sha256 IN ({', '.join('?' for _ in chunk)}) ORDER BY i.batch_id, i.file",
            chunk,
        )
        for row in rows:
            if row["sha256"] in seen:
                continue  # the same image in two batches is trained once
            seen.add(row["sha256"])
            out.setdefault(row["name"] or row["batch_id"], []).append(row["caption"] or "")
    return out


# -- publishing ------------------------------------------------------------------------------


def _base_hashes(journal: Journal, state: Path, sha256: str) -> dict[str, str]:
    """The base model's `ss_sd_model_hash`/`ss_new_sd_model_hash` (`export.sd_model_hashes`),
    from its `BaseModelRegistered`: both for a single-file base, none for a folder or the
    builtin (or a base the journal does not know)."""
    from lora_service.versions import export

    row = _one(journal, "SELECT kind, path FROM base_models WHERE sha256 = ?", [sha256])
    if row is None:
        return {}
    path = Path(row["path"]) if row["path"] else None
    if path is not None and not path.is_absolute():
        path = state / path
    return export.sd_model_hashes(row["kind"], path, sha256)


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
        if _one(journal, "SELECT 1 AS x FROM files WHERE path LIKE ?", [f"{folder_rel}/%"]):
            raise ServiceError(f"{final}: exists and is journaled; versions table out of step")
        # a folder no event points at: an earlier attempt died between rename and append
        shutil.rmtree(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return version, folder_rel, final, tmp


def seal_version_folder(tmp: Path, final: Path, card: dict[str, Any],
                        files: dict[str, str]) -> None:
    """Write `card.json` (its sha256 into `files`), fsync the folder and rename it into place:
    the version appears whole."""
    files[CARD] = _write_json(tmp / CARD, card)
    fsync_tree(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def publish_version(
    journal: Journal,
    config: Config,
    *,
    run_id: str,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    step: int,
    steps: int,
    epochs: int,
    train_loss: float | None,
    val_loss: float | None,
    val_loss_per_batch: dict[str, float],
    val_loss_known: float | None,
    parent_val_loss_known: float | None,
    images: int,
    parent_val_loss_per_batch: dict[str, float] | None = None,
    manifest: dict[str, str],
    started_at: str,
    finished_at: str,
    validation_images: int | None = None,
) -> str:
    """Write `state/versions/vNNNN/`, journal it and the gate's verdict, deploy if promoted;
    return the version name. A run that already published returns its version unchanged.

    `step` is the global step at the end (the parent's step + this run's `steps`); `manifest`
    maps every image and caption file trained on (path relative to the state folder) to its
    sha256. The gate (`versions.gate.decide`) uses the run's recorded `train.promote` and
    `train.promote_tolerance`, per batch the parent knew (`parent_val_loss_per_batch`, measured
    on the same images as `val_loss_per_batch`) and pooled; a version whose parent is no longer
    the head (someone moved it while the run trained) is held rather than undoing that move.
    `validation_images` (the images held out, when the caller counts them) goes into the kohya
    file's metadata (`ss_num_validation_images`)."""
    from lora_service.versions import export

    run = _one(journal, "SELECT * FROM runs WHERE run_id = ?", [run_id])
    if run is None:
        raise ServiceError(f"run {run_id}: not in the journal (no RunStarted)")
    if run["version"]:
        return str(run["version"])
    effective: dict[str, Any] = json.loads(run["config"] or "{}") or config.effective()
    lora = effective.get("lora", {})
    train = effective.get("train", {})
    parent: str | None = run["parent"]
    new_batches: list[str] = json.loads(run["batches"] or "[]")
    rehearsal: list[str] = json.loads(run["rehearsal"] or "[]")
    batches = list(dict.fromkeys(new_batches + rehearsal))
    parent_per_batch = dict(sorted((parent_val_loss_per_batch or {}).items()))
    unchecked = _unchecked(journal, parent, batches, val_loss_per_batch)
    tolerance = float(train.get("promote_tolerance", config.train.promote_tolerance))

    state = config.paths.state
    version, folder_rel, final, tmp = new_version_folder(journal, state)

    parent_sha = None
    if parent is not None:
        parent_row = version_row(journal, parent)
        parent_sha = version_files(parent_row).get(kohya_file(parent, version_files(parent_row)))
    # the witness: the position this version is decided on (its VersionCreated, which records
    # these files' sha256, cannot be in them)
    last_seq, last_hash = journal.position()
    kohya = kohya_name(config, version)

    try:
        adapter_files = export.write_peft(
            tmp / ADAPTER_DIR, unet, text_encoder, witness.metadata(version, last_seq, last_hash)
        )
        te_state = None
        if text_encoder is not None and getattr(text_encoder, "peft_config", None):
            te_state = export.peft_state_dict(text_encoder)
        tensors = export.to_kohya(
            export.peft_unet_state_dict(unet),
            alpha=float(lora.get("alpha", config.lora.alpha)),
            text_encoder_state=te_state,
        )
        metadata = export.ss_metadata(
            output_name=config.name,
            title=kohya.removesuffix(".safetensors"),
            version=version,
            parent=parent,
            parent_sha256=parent_sha,
            run_id=run_id,
            effective_config=effective,
            base_sha256=run["base_sha256"],
            base_model=str(effective.get("base_model", config.base_model)),
            learning_rate=run["learning_rate"],
            step=step,
            steps=steps,
            epochs=epochs,
            images=images,
            seed=run["seed"],
            captions=_captions(journal, manifest),
            manifest=manifest,
            started_at=started_at,
            finished_at=finished_at,
            journal_seq=last_seq,
            journal_hash=last_hash,
            text_encoder=te_state is not None,
            sd_model_hashes=_base_hashes(journal, state, run["base_sha256"]),
            validation_images=validation_images,
        )
        files = {f"{ADAPTER_DIR}/{k}": v for k, v in adapter_files.items()}
        files[kohya] = export.write_kohya(tmp / kohya, tensors, metadata)
        card = {
            "version": version,
            "parent": parent,
            "run_id": run_id,
            "batches": batches,
            "new_batches": new_batches,
            "rehearsal": rehearsal,
            "images": images,
            "steps": steps,
            "step": step,
            "start_step": run["start_step"],
            "epochs": epochs,
            "learning_rate": run["learning_rate"],
            "seed": run["seed"],
            "threads": run["threads"],
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_loss_per_batch": val_loss_per_batch,
            "val_loss_known": val_loss_known,
            "parent_val_loss_known": parent_val_loss_known,
            "parent_val_loss_per_batch": parent_per_batch,
            "worse_batches": worse_batches(tolerance, val_loss_per_batch, parent_per_batch),
            "unchecked_batches": unchecked,
            "base_sha256": run["base_sha256"],
            "lora": lora,
            "config": export.shareable_config(effective),
            "manifest": manifest,
            "files": dict(sorted(files.items())),
            "parent_kohya_sha256": parent_sha,
            "started_at": started_at,
            "finished_at": finished_at,
            "created_at": utc_now(),
            "journal_seq": last_seq,
            "journal_hash": last_hash,
        }
        seal_version_folder(tmp, final, card, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    created = VersionCreated(
        files={f"{folder_rel}/{rel}": sha for rel, sha in sorted(files.items())},
        version=version,
        run_id=run_id,
        parent=parent,
        batches=tuple(batches),
        new_batches=tuple(new_batches),
        images=images,
        step=step,
        steps=steps,
        train_loss=train_loss,
        val_loss=val_loss,
        val_loss_per_batch=val_loss_per_batch,
        val_loss_known=val_loss_known,
        base_sha256=run["base_sha256"],
    )
    mode = str(train.get("promote", config.train.promote))
    verdict = _verdict(
        version, parent, head(journal), mode, tolerance, val_loss_known, parent_val_loss_known,
        per_batch=val_loss_per_batch, parent_per_batch=parent_per_batch, unchecked=unchecked,
    )
    promote = isinstance(verdict, HeadMoved)
    journal.append(created, verdict)
    if promote:
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
    lineage = queries.lineage(journal, parent)
    known: list[str] = []
    if lineage:
        marks = ", ".join("?" for _ in lineage)
        known = [r["batch_id"] for r in journal.query(
            f"SELECT DISTINCT batch_id FROM version_batches WHERE version IN ({marks})"
            " ORDER BY batch_id", lineage)]
    return sorted(b for b in {*known, *batches} if b not in per_batch)


# -- the head --------------------------------------------------------------------------------


def deploy(journal: Journal, config: Config, version: str) -> Path | None:
    """Copy `version`'s kohya file to `deploy_dir/<name>.safetensors` (atomic) and journal
    `VersionExported(kind="deploy")`; None when no deploy_dir is configured."""
    deploy_dir = config.paths.deploy_dir
    if deploy_dir is None:
        return None
    files = version_files(version_row(journal, version))
    src = config.paths.state / kohya_file(version, files)
    dst = deploy_dir / f"{config.name}.safetensors"
    try:
        sha = atomic_copy(src, dst)
    except OSError as exc:
        raise ServiceError(f"{dst}: cannot deploy {version} ({exc.strerror or exc})") from None
    journal.append(VersionExported(version=version, path=str(dst), sha256=sha))
    return dst


def move_head(
    journal: Journal,
    config: Config,
    version: str,
    *,
    reason: str,
    by: Literal["rollback", "promote"],
) -> None:
    """Move the head to `version` by hand (`rollback`, `promote`) and re-deploy.

    Refuses (UsageError, nothing changed) an unknown version, the current head, and a version
    whose files fail verification against the sha256s its `VersionCreated` journaled, naming
    each bad file. A deploy that fails after the head moved is a ServiceError that says so."""
    row = version_row(journal, version)
    current = head(journal)
    if current == version:
        raise UsageError(f"{version} is already the head; nothing to do")
    problems = verify_version_files(config.paths.state, version_files(row))
    if problems:
        raise UsageError(
            f"{version}: files fail verification, head not moved: {'; '.join(problems)}"
        )
    journal.append(HeadMoved(version=version, previous=current, reason=reason, by=by))
    try:
        deploy(journal, config, version)
    except ServiceError as exc:
        raise ServiceError(f"head moved to {version}, but the deploy failed: {exc}") from None


# -- export ----------------------------------------------------------------------------------


def export_version(
    journal: Journal,
    config: Config,
    version: str,
    fmt: Literal["kohya", "peft"],
    out: Path,
    force: bool = False,
) -> Path:
    """Write a version's adapter outside the state folder and return the path written.

    `kohya`: the `.safetensors` file (to `out`, or into `out` when it is a folder). `peft`: the
    adapter folder (`adapter_model.safetensors`, `adapter_config.json`, maybe `text_encoder/`)
    as `out`. Atomic either way (temp name + rename); an existing target is refused without
    `force` (UsageError). The files are verified against the journal first (ServiceError naming
    the file). Journaled as `VersionExported(kind="export")`."""
    row = version_row(journal, version)
    files = version_files(row)
    state = config.paths.state
    problems = verify_version_files(state, files)
    if problems:
        raise ServiceError(f"{version}: files fail verification: {'; '.join(problems)}")
    out = Path(out)
    if fmt == "kohya":
        src = state / kohya_file(version, files)
        target = out / src.name if out.is_dir() else out
        if target.exists() and not force:
            raise UsageError(f"{target}: exists; pass --force to overwrite")
        if not target.parent.is_dir():
            raise UsageError(f"{target.parent}: no such folder")
        sha = atomic_copy(src, target)
    elif fmt == "peft":
        target = out
        if target.exists() and not force:
            raise UsageError(f"{target}: exists; pass --force to overwrite")
        if not target.parent.is_dir():
            raise UsageError(f"{target.parent}: no such folder")
        _replace_tree(state / version_dir(version) / ADAPTER_DIR, target)
        sha = sha256_file(target / "adapter_model.safetensors")
    else:
        raise UsageError(f"--format: {fmt!r} is not one of kohya, peft")
    journal.append(
        VersionExported(
            version=version, path=str(target.resolve()), sha256=sha, kind="export", format=fmt
        )
    )
    return target


def _replace_tree(src: Path, dst: Path) -> None:
    """Copy folder `src` to `dst` so that `dst` is the old one or the complete new one."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    fsync_tree(tmp)
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)  # a folder cannot be renamed over a non-empty folder
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()
