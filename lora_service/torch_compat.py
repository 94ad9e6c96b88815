"""Make the only torchvision that matches torch 2.13.0 importable on CPU torch.

torchvision 0.28.0 on the registry is a CUDA build: its C extension fails to load against the
CPU torch, and its fake-kernel registrations for `torchvision::nms`/`qnms` then fail because
the op schemas were never defined. transformers imports torchvision when it is installed, which
breaks `import diffusers`/`peft`. Defining the two schemas first (only when the extension did not
load) lets everything import; the ops themselves stay unavailable, which nothing here needs.

Import this module before anything that imports transformers, diffusers, peft or open_clip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix
    found = [p for loc in spec.submodule_search_locations for p in Path(loc).glob("_C*.so")]
    try:
        torch.ops.load_library(str(found[0]))
    except (OSError, RuntimeError, IndexError):
        return False
    return True


def install() -> None:
    global _library
    if _library is not None or hasattr(torch.ops.torchvision, "nms"):
        return
    if _extension_loads():
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)


install()
