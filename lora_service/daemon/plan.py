"""Deciding what the next run trains: a pure read of the journal, no torch (the daemon imports it).

`plan_run(journal, config)` returns the `RunStarted` event to append, or None when there is
nothing new to train. The caller appends it (with its `TrainingRequested`, in one transaction)
and then starts the training child on the run id.

1. The parent is the head version, unless `fresh` or there is no head yet.
2. New batches are the pending ones (never trained in the head's lineage, not out of the
   lineage after a rollback unless requeued: `journal.queries.batch_states`). A fresh run starts
   a new lineage from every batch the head's lineage knew plus the pending ones.
3. An incremental run refuses a parent whose LoRA geometry or base model differs: loading
   misaligned weights would silently train garbage.
4. Rehearsal mixes older lineage images back in so that they are `rehearsal_ratio` of the
   run's images (`split.rehearsal_count`: sized by the new data, not by the whole history),
   picked by a hash of the run's own seed (`split.rehearsal_seed`) and the image, so each run
   rotates to other old images while the same journal always plans the same run. The seed and
   the picks are journaled in `RunStarted`; the child and a resume train exactly those.
5. No image that any accepted batch holds out for validation is trained, whichever batch it
   comes from (`held_out`): the same bytes in two batches would otherwise leak validation.
6. Steps: images per epoch (validation images excluded, `split.validation_set`), batch size
   and gradient accumulation give optimizer steps per epoch; x epochs, capped by max_steps.
"""

from __future__ import annotations

import math
from collections.abc import Set
from typing import Any

from lora_service.config import Config, Train
from lora_service.daemon.split import (
    rehearsal_count,
    rehearsal_key,
    rehearsal_seed,
    validation_set,
)
from lora_service.errors import UsageError
from lora_service.journal import Journal, queries
from lora_service.journal.events import RunStarted

GEOMETRY = ("rank", "alpha", "target_modules", "train_text_encoder")


def training_images(
    rows: list[dict[str, Any]], split: float, held_anywhere: Set[str] = frozenset()
) -> list[dict[str, Any]]:
    """A batch's rows that train: not in its own validation set, nor in `held_anywhere`."""
    held = validation_set((r["sha256"] for r in rows), split)
    return [r for r in rows if r["sha256"] not in held and r["sha256"] not in held_anywhere]


def held_out(journal: Journal, split: float) -> set[str]:
    """The sha256 of every image some accepted batch holds out for validation: an image is its
    bytes, so one held out in any batch is trained from none."""
    shas = queries.image_shas_by_batch(journal)
    return {sha for batch in shas.values() for sha in validation_set(batch, split)}


def steps_for(images: int, config: Config, epochs: int) -> int:
    t = config.train
    per_epoch = max(1, math.ceil(math.ceil(images / t.batch_size) / t.gradient_accumulation_steps))
    total = per_epoch * epochs
    return min(total, t.max_steps) if t.max_steps else total


def check_geometry(journal: Journal, config: Config, head: str, base_sha256: str) -> None:
    """Refuse to continue a lineage whose adapter would not fit (names the key and the fix)."""
    fix = "use train-now --fresh to start a new lineage"
    row = queries.version(journal, head)
    if row and row["base_sha256"] and row["base_sha256"] != base_sha256:
        raise UsageError(
            f"base_model: sha256 {base_sha256[:12]} but head {head} was trained on base "
            f"{row['base_sha256'][:12]} ({config.base_model}); {fix}"
        )
    # a version trained here has its run's config; an imported root, the geometry its import
    # checked and journaled
    old = queries.version_run_config(journal, head).get("lora") or (
        queries.imported(journal, head) or {}).get("geometry", {})
    new = config.effective()["lora"]
    for key in GEOMETRY:
        if key in old and _norm(old[key]) != _norm(new[key]):
            raise UsageError(
                f"lora.{key} is {_show(new[key])} but head {head} was trained with "
                f"{key} {_show(old[key])}; {fix}"
            )


def _norm(value: Any) -> Any:
    return sorted(value) if isinstance(value, list | tuple) else value


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def next_run_id(journal: Journal) -> str:
    return f"r{queries.run_count(journal) + 1:04d}"


def learning_schedule(t: Train, parent_step: int | None) -> tuple[float, int, int]:
    """(learning rate, epochs, start step) of a run. A first run (no parent): `learning_rate`,
    `epochs`, from step 0. An incremental run from a parent at global step `parent_step`:
    `learning_rate × incremental_lr_factor` (the seeds' 40 % rule), at most
    `incremental_epochs`, continuing the parent's global step."""
    if parent_step is None:
        return t.learning_rate, t.epochs, 0
    return (t.learning_rate * t.incremental_lr_factor, min(t.epochs, t.incremental_epochs),
            parent_step)


def plan_run(
    journal: Journal,
    config: Config,
    *,
    fresh: bool = False,
    request_seq: int | None = None,
    base_sha256: str | None = None,
) -> RunStarted | None:
    """The next run, or None when no pending batch has a training image.

    `base_sha256` is the materialised base model's digest; when omitted, the registered base
    model of the configured spec is used (the daemon registers it at start-up).
    """
    t = config.train
    if base_sha256 is None:
        base_sha256 = _registered_base(journal, config)
    head = queries.head_version(journal)
    lineage = queries.lineage(journal, head)
    known = queries.lineage_batches(journal, lineage)
    pending = queries.pending_batches(journal)
    parent = None if fresh else head
    if parent is not None:
        check_geometry(journal, config, parent, base_sha256)
        new = pending
    else:
        new = list(dict.fromkeys([*(known if fresh else []), *pending]))
    split = t.validation_split
    held = held_out(journal, split)
    rows = queries.batch_images(journal, new)
    train_rows = {b: training_images(rows[b], split, held) for b in new}
    if not any(train_rows.values()):
        return None  # a batch whose every image is held out somewhere stays pending with it
    images = sum(len(train_rows[b]) for b in new)
    # images the batch's own split would train but another batch holds out (the child skips)
    elsewhere = sorted({r["sha256"] for b in new for r in training_images(rows[b], split)} & held)

    run_id = next_run_id(journal)
    seed = rehearsal_seed(t.seed, run_id)
    rehearsal_images: list[str] = []
    if parent is not None and t.rehearsal_ratio > 0:
        old = queries.batch_images(journal, known)
        fresh_shas = {r["sha256"] for b in new for r in train_rows[b]}
        pool: dict[str, str] = {}  # sha256 -> "<batch_id>/<file>", an image counted once
        for b in known:
            for r in training_images(old[b], split, held):
                if r["sha256"] not in fresh_shas:
                    pool.setdefault(r["sha256"], f"{b}/{r['file']}")
        take = rehearsal_count(images, t.rehearsal_ratio, len(pool))
        picked = sorted(pool, key=lambda sha: rehearsal_key(seed, sha))[:take]
        rehearsal_images = sorted(pool[sha] for sha in picked)
    rehearsal = sorted({name.split("/", 1)[0] for name in rehearsal_images})
    images += len(rehearsal_images)

    parent_step = None if parent is None else int(queries.version(journal, parent)["step"])  # type: ignore[index]
    lr, epochs, start_step = learning_schedule(t, parent_step)
    return RunStarted(
        run_id=run_id,
        parent=parent,
        fresh=fresh or parent is None,
        batches=tuple(new),
        rehearsal=tuple(rehearsal),
        rehearsal_images=tuple(rehearsal_images),
        rehearsal_seed=seed,
        held_out_elsewhere=tuple(elsewhere),
        images=images,
        base_sha256=base_sha256,
        start_step=start_step,
        total_steps=steps_for(images, config, epochs),
        request_seq=request_seq,
        learning_rate=lr,
        epochs=epochs,
        seed=t.seed,
        threads=t.threads,
        config=config.effective(),
    )


def _registered_base(journal: Journal, config: Config) -> str:
    sha256 = queries.base_registered(journal, config.base_model)
    if sha256 is None:
        raise UsageError(
            f"base_model: {config.base_model!r} is not registered yet; the daemon or train-now "
            "registers it before planning"
        )
    return sha256
