"""Make the only torchvision that matches torch 2.13.0 importable on CPU torch, in every
interpreter started from an environment lora-service is installed in.

torchvision 0.28.0 on the registry is a CUDA build: its C extension fails to load against the
CPU torch, and its fake-kernel registrations for `torchvision::nms`/`qnms` then fail because
the op schemas were never defined. transformers imports torchvision when it is installed, which
breaks `import diffusers`/`peft` (`from diffusers import StableDiffusionPipeline` fails with
"Could not import module 'CLIPImageProcessor'"). Defining the two schemas first (only when the
extension does not load) lets everything import; the ops themselves stay unavailable, which
nothing here needs.

How it reaches every interpreter: the package installs `lora_service_torchvision.pth` into
site-packages (`setup.py`, as a data file, so a regular and an editable install both get it).
Its one line imports this module, which puts `TorchvisionFinder` at the front of
`sys.meta_path` and does nothing else: no torch import at start-up, so the daemon's supervisor
stays free of torch. Only when something first looks for `torchvision` (an import, or
transformers' `importlib.util.find_spec` probe) does the finder call `install`, before
torchvision's own code runs; then it steps aside for good and the normal finders load it.

This is a top-level module, not part of `lora_service`, so that a user's own script gets the
fix without importing lora_service. `lora_service.torch_compat` calls the same `install`.
"""

from __future__ import annotations

import sys
from typing import Any

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: Any = None  # the torch.library.Library holding the definitions; must stay alive
_started = False  # `install` runs once: it looks torchvision up itself, which calls the finder


def _extension_loads() -> bool:
    """Whether torchvision's own C extension loads (then it defines the ops itself)."""
    import importlib.util
    from pathlib import Path

    import torch

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
    """Define the `torchvision::nms`/`qnms` schemas unless they exist or torchvision's
    extension can define them. Once per interpreter (later calls return at once); imports
    torch."""
    global _library, _started
    if _started:
        return
    _started = True
    import torch

    if hasattr(torch.ops.torchvision, "nms"):
        return
    if _extension_loads():
        return
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _library = library


class TorchvisionFinder:
    """A `sys.meta_path` finder that finds nothing: when `torchvision` is first looked for, it
    runs `install` and lets the next finders do the finding.

    It stays in `sys.meta_path` once done (a finder that removed itself while the import
    system walks the list would make it skip the next finder), answering None at the cost of
    one comparison per import."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision" and not _started:
            try:
                install()
            except Exception:  # noqa: BLE001  (never break an import; torchvision says why)
                pass
        return None


def register() -> None:
    """Put the finder first in `sys.meta_path`, once per interpreter."""
    if not any(type(f).__name__ == TorchvisionFinder.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionFinder())


register()
