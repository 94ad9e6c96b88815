"""The promotion gate: does a new version become the head? A pure function, no torch.

`train.promote` modes:
- `always`: every new version becomes the head.
- `manual`: every new version is held until `lora-service promote V`.
- `if_not_worse` (default): the version becomes the head unless its validation loss on what its
  parent already knew is worse than the parent's loss on the same images by more than
  `tolerance`, *relative*: held when `child > parent * (1 + tolerance)`. Checked for each batch
  the parent knew (`per_batch` vs `parent_per_batch`), so forgetting one small batch cannot
  hide in the mean over many, and for the pooled mean (`known` vs `parent_known`). Relative,
  because loss scales differ between base models and resolutions; 0.05 means "up to 5 % worse
  is noise". When nothing compares (a first version, no validation images) the version is
  promoted: the gate only ever holds on evidence. Batches without a validation image (too small
  to hold one out, or `validation_split: 0`) can never be compared: `unchecked` names them in
  the reason, so the verdict says what it did not look at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

MODES = ("always", "if_not_worse", "manual")


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def _rise(child: float, parent: float) -> str:
    return f"{(child / parent - 1.0) * 100:+.1f}%" if parent else "+inf%"


def worse_batches(
    tolerance: float, per_batch: Mapping[str, float], parent_per_batch: Mapping[str, float]
) -> list[str]:
    """The batches measured on both sides whose loss rose beyond the relative tolerance, or
    is not a number at all (NaN compares false with everything: a diverged child would pass)."""
    return sorted(
        b for b, parent in parent_per_batch.items()
        if b in per_batch and not per_batch[b] <= parent * (1.0 + tolerance)
    )


def decide(
    mode: str,
    tolerance: float,
    known: float | None,
    parent_known: float | None,
    *,
    per_batch: Mapping[str, float] | None = None,
    parent_per_batch: Mapping[str, float] | None = None,
    unchecked: Sequence[str] = (),
) -> tuple[bool, str]:
    """(promote?, reason). The reason names the losses, each batch that got worse and the
    unchecked batches, so `status`/`versions` can show why."""
    losses = f"val_loss_known {_fmt(known)} vs parent {_fmt(parent_known)}"
    note = f"; unchecked (no validation image): {', '.join(unchecked)}" if unchecked else ""
    if mode == "always":
        return True, f"promote: always ({losses}){note}"
    if mode == "manual":
        return False, f"promote: manual ({losses}); run `lora-service promote` to use it{note}"
    if mode != "if_not_worse":
        raise ValueError(f"train.promote: {mode!r} is not one of {', '.join(MODES)}")
    child, parent = per_batch or {}, parent_per_batch or {}
    worse = worse_batches(tolerance, child, parent)
    if worse:
        each = ", ".join(
            f"batch {b} {_fmt(child[b])} vs parent {_fmt(parent[b])} ({_rise(child[b], parent[b])})"
            for b in worse
        )
        return False, (
            f"held: {each}, over the {tolerance * 100:g}% tolerance ({losses}){note}"
        )
    if known is not None and not math.isfinite(known):
        return False, f"held: validation loss is {known} (training diverged) ({losses}){note}"
    if known is None or parent_known is None:
        return True, f"promote: nothing to compare ({losses}){note}"
    limit = parent_known * (1.0 + tolerance)
    if not known <= limit:  # NaN or inf: a diverged child is never promoted
        return False, (
            f"held: {losses}, {_rise(known, parent_known)} on what the parent knew, over the "
            f"{tolerance * 100:g}% tolerance (limit {limit:.6g}){note}"
        )
    checked = f", {len(parent)} batches each within it" if parent else ""
    return True, f"promote: not worse ({losses}, limit {limit:.6g}{checked}){note}"
