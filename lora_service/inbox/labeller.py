"""Labelling, the torch-free half: captions for images that have none, as zero-shot open_clip
tags computed by the labelling child (`python -m lora_service.labelling`, with `models.clip`).
The daemon and `lora-service label` reach the model only through that process, so a model that
crashes or eats memory takes down the child, not the service.

- `make_labeller(config)`: the intake's `Labeller` for the daemon (None when labelling is off).
- `label_folder(directory, labeller, extensions)`: writes `<stem>.txt` sidecars for `label DIR`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lora_service.config import Config
from lora_service.errors import ServiceError, UsageError
from lora_service.inbox.captions import read_metadata
from lora_service.process import child_env
from lora_service.store import fsync_dir, sha256_file

HOW_TO_ENABLE = (
    "labelling is not configured: set `labelling.enabled: true` and "
    "`labelling.weights: /path/to/open_clip_weights` (a local open_clip weights file for "
    "`labelling.model`; nothing is downloaded) in the config file"
)
CHILD_TIMEOUT_S = 600.0

Labeller = Callable[[list[Path]], dict[str, str]]


def weights_path(config: Config) -> Path:
    """The configured local weights file, or UsageError saying how to configure one."""
    weights = config.labelling.weights
    if weights is None:
        raise UsageError(HOW_TO_ENABLE)
    if not Path(weights).is_file():
        raise UsageError(f"labelling.weights: {weights}: no such file")
    return Path(weights)


class ChildLabeller:
    """The daemon's labeller: runs `python -m lora_service.labelling --config C FILE...` and
    reads its JSON answer `{file name: caption}`. Torch stays in the child; the model is
    loaded per call, which is fine at the rate batches arrive (seconds per batch). The child
    dies with the daemon (PR_SET_PDEATHSIG, like the training child).

    `fault`: tests only, passed on to the child (`hang`: it hangs before loading anything)."""

    def __init__(self, config: Config, fault: str | None = None) -> None:
        if config.source is None:
            raise ServiceError("labelling needs a config file (the child reads it)")
        self.config_path = Path(config.source)
        self.model = config.labelling.model
        self.weights_sha256 = sha256_file(weights_path(config))
        self.fault = fault

    def __call__(self, paths: list[Path]) -> dict[str, str]:
        if not paths:
            return {}
        argv = [sys.executable, "-m", "lora_service.labelling", "--config", str(self.config_path),
                *(["--fault", self.fault] if self.fault else []), *(str(p) for p in paths)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL, env=child_env())
        except subprocess.TimeoutExpired:
            raise ServiceError(f"labelling child timed out after {CHILD_TIMEOUT_S:.0f} s") from None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ServiceError(f"labelling child exited {done.returncode}: {tail}")
        answer = json.loads(done.stdout)
        self.model = answer["model"]
        self.weights_sha256 = answer["weights_sha256"]
        return {str(k): str(v) for k, v in answer["captions"].items()}


def make_labeller(config: Config) -> Labeller | None:
    """The intake's labeller for the daemon, or None when labelling is off.

    Torch-free: captioning runs in a child process. Raises UsageError when labelling is on
    but the weights file is missing (checked at start, not at the first captionless image)."""
    if not config.labelling.enabled:
        return None
    return ChildLabeller(config)


# -- label DIR -------------------------------------------------------------------------------


def uncaptioned(directory: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Images directly in `directory` with no `<stem>.txt` and no `metadata.csv` row."""
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such folder")
    metadata = directory / "metadata.csv"
    in_csv = set(read_metadata(metadata).rows) if metadata.is_file() else set()
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and not path.is_symlink()
        and path.suffix.lower().lstrip(".") in extensions
        and not path.with_suffix(".txt").exists()
        and path.name not in in_csv
    )


def write_new(path: Path, data: bytes) -> bool:
    """Write `path` atomically unless it exists; False (nothing written) when it does.

    Temp file, fsync, then `link` — which, unlike `rename`, refuses an existing name, so a
    caption someone wrote meanwhile is never replaced."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def label_folder(
    directory: Path, labeller: Labeller, extensions: tuple[str, ...]
) -> dict[str, str | None]:
    """Caption the images of `directory` that have none; {file name: caption written, or None
    for an image the labeller could not read}. Existing captions are never touched."""
    images = uncaptioned(directory, extensions)
    captions = labeller(images) if images else {}
    written: dict[str, str | None] = {}
    for path in images:
        caption = captions.get(path.name)
        if caption is not None and write_new(path.with_suffix(".txt"), (caption + "\n").encode()):
            written[path.name] = caption
        elif caption is None:
            written[path.name] = None
    return written
