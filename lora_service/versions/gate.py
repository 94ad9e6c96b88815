"""The promotion gate: does a new version become the head? A pure function, no torch.

`train.promote` modes:
- `always`: every new version becomes the head.
- `manual`: every new version is held until `lora-service promote V`.
- `if_not_worse` (default): the version becomes the head unless its validation loss on the
  batches its parent already knew (`known`) is worse than the parent's loss on the same images
  (`parent_known`) by more than `tolerance`, *relative*: held when
  `known > parent_known * (1 + tolerance)`. Relative, because loss scales differ between base
  models and resolutions; 0.05 means "up to 5 % worse is noise". When either loss is missing
  (a first version, no validation images) there is nothing to compare and the version is
  promoted: the gate only ever holds on evidence.
"""

from __future__ import annotations

MODES = ("always", "if_not_worse", "manual")


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def decide(
    mode: str, tolerance: float, known: float | None, parent_known: float | None
) -> tuple[bool, str]:
    """(promote?, reason). The reason names both losses so `status`/`versions` can show why."""
    losses = f"val_loss_known {_fmt(known)} vs parent {_fmt(parent_known)}"
    if mode == "always":
        return True, f"promote: always ({losses})"
    if mode == "manual":
        return False, f"promote: manual ({losses}); run `lora-service promote` to use it"
    if mode != "if_not_worse":
        raise ValueError(f"train.promote: {mode!r} is not one of {', '.join(MODES)}")
    if known is None or parent_known is None:
        return True, f"promote: nothing to compare ({losses})"
    limit = parent_known * (1.0 + tolerance)
    if known > limit:
        rise = (known / parent_known - 1.0) * 100 if parent_known else float("inf")
        return False, (
            f"held: {losses}, {rise:+.1f}% on what the parent knew, over the "
            f"{tolerance * 100:g}% tolerance (limit {limit:.6g})"
        )
    return True, f"promote: not worse ({losses}, limit {limit:.6g})"
