"""Which images of a batch are held out for validation: a pure rule on image hashes, no torch.

A batch is immutable (content-addressed), so ranking its images by `sha256("val:" + image
sha256)` and holding out the first `round(n * validation_split)` gives the same split forever,
on any machine, in any process (daemon, training child, CLI). At least one image is held out
when the split is above zero and the batch has two or more images, and at least one always
trains, so an 8-image batch at the default 0.1 still gets a validation image.

The split is per batch, but an image is identified by its bytes: when two batches share an
image and one of them holds it out, the planner (`plan.held_out`) keeps it out of training
everywhere, or its validation loss would measure memory.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable


def _rank(image_sha: str) -> str:
    return hashlib.sha256(f"val:{image_sha}".encode()).hexdigest()


def validation_count(n: int, split: float) -> int:
    if split <= 0 or n < 2:
        return 0
    return min(max(1, math.floor(n * split + 0.5)), n - 1)


def validation_set(image_shas: Iterable[str], split: float) -> set[str]:
    """The sha256s of the images held out for validation."""
    shas = sorted(set(image_shas), key=_rank)
    return set(shas[: validation_count(len(shas), split)])


def rehearsal_seed(seed: int, run_id: str) -> int:
    """The seed of one run's rehearsal picks: the configured seed and the run id, so every run
    draws other old images (rotation) while the same journal always plans the same picks."""
    return int(hashlib.sha256(f"rehearsal-run:{seed}:{run_id}".encode()).hexdigest()[:8], 16)


def rehearsal_key(seed: int, image_sha: str) -> str:
    """Order of older images for rehearsal picks: deterministic from the run's rehearsal seed."""
    return hashlib.sha256(f"rehearsal:{seed}:{image_sha}".encode()).hexdigest()


def rehearsal_count(new_images: int, ratio: float, pool: int) -> int:
    """How many old images a run rehearses: `ratio` is their share of the run's images, so
    `ratio × new / (1 − ratio)` of them (at least one when the ratio is above zero), capped by
    the pool; sized by the new data, never by the lineage's whole history."""
    if ratio <= 0 or new_images <= 0 or pool <= 0:
        return 0
    if ratio >= 1:
        return pool
    return min(pool, max(1, math.floor(ratio * new_images / (1 - ratio) + 0.5)))
