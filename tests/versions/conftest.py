"""Fixtures for the versions tests: the builtin tiny SD with a LoRA that is not the identity,
and a journal holding a real accepted batch and a real `RunStarted`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from lora_service.config import Config
from lora_service.journal import Journal
from lora_service.journal.events import BatchAccepted, ImageRecord, RunStarted

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora(model: Any, *, rank: int, alpha: float, targets: list[str], seed: int) -> Any:
    """Inject a LoRA and give lora_B random values (peft starts it at zero, which would make
    every comparison trivially equal)."""
    import torch
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


@pytest.fixture
def tiny_pipe() -> Callable[[], Any]:
    """A fresh builtin tiny-sd pipeline per call (bit-identical each time)."""
    from lora_service.models.base_model import build_tiny_sd

    return build_tiny_sd


@pytest.fixture
def lora_unet(tiny_pipe: Callable[[], Any]) -> Callable[..., Any]:
    def make(*, rank: int = 4, alpha: float = 8.0, seed: int = 1) -> Any:
        return add_lora(tiny_pipe().unet, rank=rank, alpha=alpha, targets=UNET_TARGETS, seed=seed)

    return make


IMAGES = (
    ImageRecord(
        file="a.png",
        sha256="a" * 64,
        caption="cat, red hat",
        caption_source="sidecar",
        width=32,
        height=32,
    ),
    ImageRecord(
        file="b.png",
        sha256="b" * 64,
        caption="cat, blue",
        caption_source="sidecar",
        width=32,
        height=32,
    ),
)


def _start_run(
    journal: Journal,
    config: Config,
    run_id: str,
    parent: str | None,
    start_step: int = 0,
    base_sha256: str = "f" * 64,
) -> None:
    """Journal the batch (once) and a `RunStarted`, as the trainer's planner would."""
    if not journal.query("SELECT 1 AS x FROM batches WHERE batch_id = 'batch1'"):
        journal.append(
            BatchAccepted(name="cats", batch_id="batch1", images=IMAGES, moved_to=".accepted/cats")
        )
    journal.append(
        RunStarted(
            run_id=run_id,
            parent=parent,
            fresh=parent is None,
            batches=("batch1",),
            base_sha256=base_sha256,
            start_step=start_step,
            total_steps=4,
            learning_rate=config.train.learning_rate,
            epochs=2,
            seed=7,
            threads=1,
            config=config.effective(),
        )
    )


MANIFEST = {
    "batches/batch1/a.png": "a" * 64,
    "batches/batch1/a.txt": "c" * 64,
    "batches/batch1/b.png": "b" * 64,
    "batches/batch1/b.txt": "d" * 64,
}


def _publish_kwargs(**over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "step": 4,
        "steps": 4,
        "epochs": 2,
        "train_loss": 0.5,
        "val_loss": 0.4,
        "val_loss_per_batch": {"batch1": 0.4},
        "val_loss_known": None,
        "parent_val_loss_known": None,
        "images": 2,
        "manifest": MANIFEST,
        "started_at": "2025-01-01T00:00:00.000000Z",
        "finished_at": "2025-01-01T00:00:05.000000Z",
    }
    return kw | over


def publish_version(
    journal: Journal, config: Config, *, run_id: str, unet: Any, text_encoder: Any = None,
    **measured: Any,
) -> str:
    """What the training child does at the end of a run, for tests holding peft modules."""
    from lora_service.models.adapters import TrainedAdapter
    from lora_service.versions.publish import Measured
    from lora_service.versions.publish import publish_version as publish

    return publish(journal, config, run_id, TrainedAdapter(unet, text_encoder),
                   Measured(**measured))


@pytest.fixture
def start_run() -> Callable[..., None]:
    return _start_run


@pytest.fixture
def publish_kwargs() -> Callable[..., dict[str, Any]]:
    """The trainer's keyword arguments to publish_version, with overrides."""
    return _publish_kwargs


@pytest.fixture
def add_lora_fn() -> Callable[..., Any]:
    return add_lora
