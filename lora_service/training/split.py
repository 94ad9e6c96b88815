"""Which images of a batch are held out for validation: a pure rule on image hashes, no torch.

A batch is immutable (content-addressed), so ranking its images by `sha256("val:" + image
sha256)` and holding out the first `round(n * validation_split)` gives the same split forever,
on any machine, in any process (daemon, training child, CLI). At least one image is held out
when the split is above zero and the batch has two or more images, and at least one always
trains, so an 8-image batch at the default 0.1 still gets a validation image.
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


def rehearsal_key(seed: int, image_sha: str) -> str:
    """Order of older images for rehearsal picks: deterministic from the run's seed."""
    return hashlib.sha256(f"rehearsal:{seed}:{image_sha}".encode()).hexdigest()
