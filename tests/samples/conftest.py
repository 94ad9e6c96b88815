"""Two published versions of the builtin tiny SD with their samples, built once per session.

Versions are made the way the training child makes them, minus the training: a peft-wrapped
tiny UNet with random (non-identity) LoRA weights goes through `publish_version`, then
`render_samples` — v0001 loading base model and adapter from the state folder, v0002 getting
the in-memory modules as the training child passes them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lora_service.config import Config, load_config
from lora_service.journal import Journal
from tests.training.conftest import write_tiny_config
from tests.versions.conftest import UNET_TARGETS, _publish_kwargs, _start_run, add_lora

SAMPLES = {
    "enabled": True,
    "prompts": ["a red square", "a blue circle"],
    "seeds": [0, 3],
    "steps": 3,
    "size": 32,
}


@dataclass
class Built:
    config: Config
    unets: dict[str, Any]  # version -> the in-memory peft UNet it was published from

    @property
    def state(self) -> Path:
        return self.config.paths.state


def publish(
    journal: Journal,
    config: Config,
    run_id: str,
    parent: str | None,
    unet: Any,
    base_sha256: str,
    val_loss: float,
    start_step: int,
) -> str:
    from tests.versions.conftest import publish_version

    _start_run(journal, config, run_id, parent, start_step, base_sha256=base_sha256)
    kwargs = _publish_kwargs(step=start_step + 4, val_loss=val_loss,
                             val_loss_per_batch={"batch1": val_loss})
    return publish_version(journal, config, run_id=run_id, unet=unet, **kwargs)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    from lora_service.models.base_model import build_tiny_sd, materialise
    from lora_service.models.render import render_samples

    root = tmp_path_factory.mktemp("samples")
    config = write_tiny_config(root, {"promote": "always"}, samples=SAMPLES)
    base = materialise(config.base_model, config.paths.state)
    journal = Journal.for_state(config.paths.state)
    unets, pipes = {}, {}
    for n, (parent, seed, loss) in enumerate(((None, 1, 0.4), ("v0001", 2, 0.35))):
        pipe = build_tiny_sd()
        unet = add_lora(pipe.unet, rank=4, alpha=8.0, targets=UNET_TARGETS, seed=seed)
        version = publish(
            journal, config, f"run{n + 1}", parent, unet, base.sha256, loss, start_step=4 * n
        )
        unets[version], pipes[version] = unet, pipe
    assert list(unets) == ["v0001", "v0002"]
    render_samples(journal, config, "v0001")  # everything loaded from the state folder
    child = pipes["v0002"]  # as the training child: every module passed in, nothing loaded
    render_samples(
        journal,
        config,
        "v0002",
        unet=child.unet,
        text_encoder=child.text_encoder,
        vae=child.vae,
        tokenizer=child.tokenizer,
        scheduler=child.scheduler,
    )
    journal.close()
    return Built(config, unets)


@pytest.fixture
def copy_of(built: Built, tmp_path: Path) -> Config:
    """The built state and config copied, for a test that changes them."""
    shutil.copytree(built.state.parent / "conf", tmp_path / "conf")
    shutil.copytree(built.state, tmp_path / "state")
    return load_config(tmp_path / "conf" / "config.yaml")
