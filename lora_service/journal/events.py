"""Every event the journal can hold: past-tense facts, one explicit class each.

Events are an audit format, so each is written out by hand with a schema version (bump
`SCHEMA` and keep reading old payloads when a class changes). Fields named `files` map a path
relative to the state folder to the sha256 of its bytes; `verify` checks every one of them that
no later event has released (`released`, e.g. a pruned checkpoint).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

Sha256 = str
FileMap = dict[str, Sha256]


class Event(BaseModel):
    """Base of all events; subclasses set SCHEMA and their fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SCHEMA: ClassVar[int] = 1

    files: FileMap = Field(default_factory=dict)
    released: tuple[str, ...] = ()

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    def payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- service ---------------------------------------------------------------------------------


class ServiceStarted(Event):
    version: str
    pid: int
    config_hash: str
    config_path: str | None = None
    hostname: str = ""


class ServiceStopped(Event):
    pid: int
    reason: str = "signal"


class BaseModelRegistered(Event):
    spec: str  # builtin:tiny-sd, a folder or a .safetensors file as configured
    sha256: Sha256  # identity of the model: digest over its weight files
    path: str  # where it lives (relative to state for the builtin)
    kind: Literal["builtin", "diffusers", "single_file"]


# -- intake ----------------------------------------------------------------------------------


class ImageRecord(Frozen):
    file: str  # name inside the batch
    sha256: Sha256
    caption: str
    caption_source: Literal["sidecar", "metadata.csv", "clip"]
    width: int
    height: int


class BadFile(Frozen):
    file: str
    reason: str


class BatchDetected(Event):
    name: str  # the inbox sub-folder


class BatchAccepted(Event):
    name: str
    batch_id: str
    images: tuple[ImageRecord, ...]
    bad: tuple[BadFile, ...] = ()
    notes: tuple[str, ...] = ()
    moved_to: str  # inbox-relative, e.g. .accepted/<name>


class BatchRejected(Event):
    name: str
    reason: str
    bad: tuple[BadFile, ...] = ()
    notes: tuple[str, ...] = ()
    moved_to: str


class BatchDuplicate(Event):
    name: str
    batch_id: str
    duplicate_of: str  # name under which the same content was first accepted
    moved_to: str


class CaptionsGenerated(Event):
    name: str
    model: str  # open_clip architecture
    weights_sha256: Sha256
    captions: dict[str, str]  # file -> caption


class BatchRequeued(Event):
    batch_id: str
    reason: str = ""


# -- training --------------------------------------------------------------------------------


class TrainingRequested(Event):
    fresh: bool = False
    reason: Literal["manual", "schedule", "arrival"] = "manual"
    pid: int | None = None


class RunStarted(Event):
    SCHEMA: ClassVar[int] = 2  # 2: rehearsal_seed, held_out_elsewhere (1 reads with defaults)

    run_id: str
    parent: str | None  # version the adapter starts from; None for a fresh lineage
    fresh: bool
    batches: tuple[str, ...]  # new batches
    rehearsal: tuple[str, ...] = ()  # earlier lineage batches mixed in
    rehearsal_images: tuple[str, ...] = ()  # "<batch_id>/<file>" picked from those batches
    rehearsal_seed: int | None = None  # drew those picks (split.rehearsal_seed); None before 2
    # sha256s in `batches` that their own split would train but another batch holds out
    held_out_elsewhere: tuple[str, ...] = ()
    images: int = 0  # training images this run sees per epoch (validation images excluded)
    base_sha256: Sha256
    start_step: int  # global step the run starts from (the parent's step)
    total_steps: int  # steps this run will take
    request_seq: int | None = None  # the TrainingRequested it answers
    learning_rate: float
    epochs: int
    seed: int
    threads: int
    config: dict[str, Any]  # effective configuration


class CheckpointSaved(Event):
    run_id: str
    step: int  # global step
    path: str


class LossLogged(Event):
    run_id: str
    step: int
    loss: float
    lr: float
    images_per_s: float | None = None


class RunResumed(Event):
    run_id: str
    from_step: int  # global step of the checkpoint, or start_step when restarted
    checkpoint: str | None  # None: restarted from the start
    reason: str = ""


class RunFailed(Event):
    run_id: str
    reason: str
    attempt: int = 1
    exit_code: int | None = None
    signal: str | None = None
    stderr_tail: str = ""
    gave_up: bool = False


class VersionCreated(Event):
    version: str  # vNNNN
    run_id: str
    parent: str | None
    batches: tuple[str, ...]  # every batch trained in this run, rehearsal included
    new_batches: tuple[str, ...]
    images: int
    step: int  # global step at the end
    steps: int  # steps of this run
    train_loss: float | None
    val_loss: float | None
    val_loss_per_batch: dict[str, float] = Field(default_factory=dict)
    val_loss_known: float | None = None  # on batches the parent already knew
    base_sha256: Sha256


class VersionHeld(Event):
    SCHEMA: ClassVar[int] = 2  # 2: the per-batch fields (1 reads with defaults)

    version: str
    parent: str | None
    val_loss_known: float | None
    parent_val_loss_known: float | None
    tolerance: float
    reason: str
    worse_batches: tuple[str, ...] = ()  # known batches whose own loss rose beyond tolerance
    parent_val_loss_per_batch: dict[str, float] = Field(default_factory=dict)  # known batches
    unchecked_batches: tuple[str, ...] = ()  # too small to hold out an image: never compared


class ImportedGeometry(Frozen):
    """An imported adapter's LoRA shape, in the config's own terms (`lora.*`)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    train_text_encoder: bool


class VersionImported(Event):
    """An adapter trained elsewhere, stored as a version with no parent: a lineage root.

    `files` holds the version folder as a published version's (peft layout, kohya file,
    card.json) plus `origin/`, the bytes as they were imported."""

    version: str
    origin: str  # the file or folder name as given, without its folder (no local path)
    format: Literal["kohya", "peft"]
    sha256: Sha256  # of the imported weights file (adapter_model.safetensors for a peft folder)
    origin_files: dict[str, Sha256]  # every file read, by its name in the origin
    geometry: ImportedGeometry
    modules: int  # LoRA modules (UNet and text encoder)
    base_sha256: Sha256  # the base model it was checked against and stored for


class HeadMoved(Event):
    version: str
    previous: str | None
    reason: str
    by: Literal["promotion", "rollback", "promote"]


class VersionExported(Event):
    version: str
    path: str  # outside the state folder (deploy_dir), so not in `files`
    sha256: Sha256  # of the kohya file; of adapter_model.safetensors for a peft export
    kind: Literal["deploy", "export"] = "deploy"  # deploy_dir follows the head / user export
    format: Literal["kohya", "peft"] = "kohya"


class SamplesRendered(Event):
    SCHEMA: ClassVar[int] = 2  # 2: judged (1 reads with defaults)

    version: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    seconds: float | None = None
    error: str | None = None
    # steps, guidance_scale, size, negative_prompt, scheduler, threads: stored samples are
    # reused (compare) only when these match what would be rendered now
    settings: dict[str, Any] = Field(default_factory=dict)
    # the base model's judge (builtin:shapes-sd ships one) on these samples, per concept the
    # prompts name: {"zorb": {"shows": 0.75, "colour": 1.0, "images": 4}}; {} without a judge
    judged: dict[str, dict[str, int | float]] = Field(default_factory=dict)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        ServiceStarted,
        ServiceStopped,
        BaseModelRegistered,
        BatchDetected,
        BatchAccepted,
        BatchRejected,
        BatchDuplicate,
        CaptionsGenerated,
        TrainingRequested,
        RunStarted,
        CheckpointSaved,
        LossLogged,
        RunResumed,
        RunFailed,
        VersionCreated,
        HeadMoved,
        VersionExported,
        BatchRequeued,
        SamplesRendered,
        VersionHeld,
        VersionImported,
    )
}


def decode(type_name: str, payload: dict[str, Any]) -> Event:
    """Rebuild an event from its stored type and payload (raises KeyError/ValidationError)."""
    return EVENT_TYPES[type_name].model_validate(payload)
