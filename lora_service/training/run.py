"""One training run, start to version, as the training child executes it.

`execute(config, run_id)`:
1. Read the run's `RunStarted` from the journal: it fixes everything (batches, rehearsal images,
   steps, lr, seed, threads, effective config). The child never re-plans. fp16 without a CUDA
   GPU is refused here (`trainer.check_precision`).
2. Materialise the base model and check its sha256 against the run's.
3. Encode the training and validation images once (latents + text embeddings, cached).
4. Build the trainer (LoRA, parent adapter when incremental; warmup from `Train.warmup_for`
   and the lineage's first run) and hand it to accelerate; validate the parent through that
   same prepared model; then look for the newest checkpoint whose files verify: resume from it
   (`RunResumed`), or, when the run already has a folder but no usable checkpoint, restart from
   the beginning (`RunResumed` with checkpoint None and why).
5. Train; every `save_steps` and at the end write a checkpoint (`CheckpointSaved`, pruning beyond
   `keep_checkpoints`); `LossLogged` every LOSS_EVERY steps and at the last.
6. Validate (fixed noise per image), then publish the version through
   `lora_service.versions.publish.publish_version`.

SIGTERM/SIGINT set a flag; the loop checks it after each step, writes a checkpoint and returns
`STOPPED` (exit 0): the run stays `running` in the journal and the next start resumes it.
Any other failure is journaled `RunFailed` by `__main__` (exit 1).

Every step beats the heartbeat (`heartbeat.beat`); loading, publishing and samples run under
`heartbeat.phase`, so only the training loop's own progress (or lack of it) is what the daemon's
stall watch sees.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import lora_service.models.torch_compat  # noqa: F401  (must precede peft/diffusers)

# isort: split
import torch
from tqdm import tqdm

from lora_service.config import Config, run_config
from lora_service.daemon.split import validation_set
from lora_service.errors import ServiceError
from lora_service.journal import Journal, queries
from lora_service.journal.events import CheckpointSaved, LossLogged, RunResumed, RunStarted
from lora_service.journal.projections import canonical
from lora_service.journal.sqlite import utc_now
from lora_service.logs import get_logger
from lora_service.models import base_model
from lora_service.models.adapters import TEXT_ENCODER_DIR, TrainedAdapter, load_peft_into
from lora_service.models.render import render_samples
from lora_service.store import disk_trouble, sha256_bytes
from lora_service.training import checkpoint, heartbeat
from lora_service.training.data import EncodedData, Item
from lora_service.training.faults import Faults
from lora_service.training.timing import Stopwatch
from lora_service.training.trainer import Step, Trainer, check_precision
from lora_service.versions.publish import Measured, publish_version

LOSS_EVERY = 5
FLUSH_EVERY_S = 1.0
log = get_logger("lora_service.training")
FINISHED, STOPPED = "finished", "stopped"


@dataclass
class Outcome:
    status: str  # FINISHED or STOPPED
    step: int
    version: str | None = None
    val: dict[str, Any] = field(default_factory=dict)


class StopFlag:
    """Signal handlers only set this; the loop acts on it between steps (gunicorn style)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None


def find_run(journal: Journal, run_id: str) -> RunStarted:
    for stored in journal.events(types=("RunStarted",)):
        if stored.payload.get("run_id") == run_id:
            return stored.event  # type: ignore[return-value]
    raise ServiceError(f"run {run_id}: no RunStarted event in {journal.path}")


def _items(journal: Journal, run: RunStarted, split: float) -> tuple[list[Item], list[Item]]:
    """(training items, validation items) for the run, in a fixed order."""
    parent_known = queries.lineage_batches(journal, queries.lineage(journal, run.parent))
    wanted = list(dict.fromkeys([*run.batches, *run.rehearsal, *parent_known]))
    rows = queries.batch_images(journal, wanted)
    rehearsal = set(run.rehearsal_images)
    elsewhere = set(run.held_out_elsewhere)  # another batch validates on these bytes
    train: list[Item] = []
    val: list[Item] = []
    for batch_id in wanted:
        held = validation_set((r["sha256"] for r in rows[batch_id]), split)
        for r in rows[batch_id]:
            item = Item(batch_id, r["file"], r["sha256"], r["caption"])
            if r["sha256"] in held:
                val.append(item)
            elif (batch_id in run.batches and r["sha256"] not in elsewhere
                  or item.name in rehearsal):
                train.append(item)
    return train, val


def first_run_steps(journal: Journal, run: RunStarted) -> int:
    """Steps of the first run of `run`'s lineage (`run` itself when it starts one, or when its
    lineage holds no run of ours, e.g. an imported root): `train.warmup_steps` counts there."""
    for version in reversed(queries.lineage(journal, run.parent)):  # oldest first
        row = queries.version(journal, version)
        made_by = queries.run(journal, row["run_id"]) if row and row["run_id"] else None
        if made_by and made_by["total_steps"]:
            return int(made_by["total_steps"])
    return run.total_steps


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _val_losses(items: list[Item], losses: list[float], known: set[str]) -> dict[str, Any]:
    per_batch: dict[str, list[float]] = {}
    for item, loss in zip(items, losses, strict=True):
        per_batch.setdefault(item.batch_id, []).append(loss)
    return {
        "val_loss": _mean(losses),
        "val_loss_per_batch": {b: _mean(v) for b, v in per_batch.items()},
        "val_loss_known": _mean([loss for i, loss in zip(items, losses, strict=True)
                                 if i.batch_id in known]),
    }


class RunContext:
    """Everything `execute` builds, kept together so tests and the bench can reuse it."""

    def __init__(self, config: Config, journal: Journal, run: RunStarted,
                 faults: Faults | None = None, clock: Stopwatch | None = None) -> None:
        self.faults = faults or Faults()
        self.clock = clock = clock or Stopwatch()
        self.checkpoints = checkpoint.Writer()
        self.config, self.journal, self.run = config, journal, run
        self.state_dir = config.paths.state
        cfg = run.config
        self.lora_cfg, self.train_cfg = cfg["lora"], cfg["train"]
        # the run's own recorded config decides, not whatever the file says today
        self.run_config = run_config(cfg, config)
        # digest of the run's recorded config (paths excluded: a moved state folder resumes)
        recorded = {k: v for k, v in run.config.items() if k != "paths"}
        self.config_digest = sha256_bytes(canonical(recorded).encode())
        check_precision(self.run_config.train.mixed_precision)  # before anything slow
        torch.set_num_threads(run.threads)
        with clock.phase("base model"):
            self.base = base_model.materialise(self.run_config.base_model, self.state_dir)
            if self.base.sha256 != run.base_sha256:
                raise ServiceError(
                    f"run {run.run_id}: base model {self.run_config.base_model} has sha256 "
                    f"{self.base.sha256[:12]}, the run was planned on {run.base_sha256[:12]}"
                )
            unet, vae, text_encoder, tokenizer, scheduler = (
                base_model.load_pipeline_components(self.base))
        t = self.run_config.train
        train_items, val_items = _items(journal, run, t.validation_split)
        train_text = self.run_config.lora.train_text_encoder
        common = {
            "state_dir": self.state_dir,
            "base_sha256": self.base.sha256,
            "resolution": t.resolution,
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "cache_on_disk": t.cache_latents,
            "encode_text": not train_text,
        }
        with clock.phase("cache"):
            self.train_data = EncodedData(train_items, **common)
            self.val_data = EncodedData(val_items, **common)
        if not len(self.train_data):
            raise ServiceError(f"run {run.run_id}: no training images")
        lineage = queries.lineage(journal, run.parent)
        self.parent_known = set(queries.lineage_batches(journal, lineage))
        with clock.phase("set-up"):
            self.trainer = Trainer(
                self.run_config,
                run,
                self.train_data,
                unet,
                scheduler,
                text_encoder=text_encoder if train_text else None,
                warmup_steps=t.warmup_for(run.total_steps, first_run_steps(journal, run)),
            )
            if run.parent is not None:
                self._load_parent()

    def _load_parent(self) -> None:
        folder = self.state_dir / "versions" / self.run.parent / "adapter"  # type: ignore[operator]
        if not folder.is_dir():
            raise ServiceError(f"run {self.run.run_id}: parent adapter {folder} is missing")
        load_peft_into(self.trainer.unet, folder)
        if self.trainer.train_text:
            load_peft_into(self.trainer.text_encoder, folder / TEXT_ENCODER_DIR)

    # -- checkpoints --------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        tr = self.trainer
        epoch, window = tr.window(tr.local_step)
        pos = window.start  # micro-batches of the epoch's order already trained
        return {
            "run_id": self.run.run_id,
            "step": tr.global_step,
            "local_step": tr.local_step,
            "epoch": epoch,
            "position": pos,
            "data_order": tr.order(epoch),
            "threads": torch.get_num_threads(),
            "processes": tr.accelerator.num_processes,
            "config_digest": self.config_digest,
            "losses": tr.loss_history(),
        }

    def save_checkpoint(self) -> None:
        """Snapshot the training state now; write and journal it in the background
        (`checkpoint.Writer`; `self.checkpoints.wait()` for it to land). Main process only: the
        others wait for it to take the snapshot."""
        tr = self.trainer
        if not tr.accelerator.is_main_process:
            tr.accelerator.wait_for_everyone()
            return
        scaler = tr.accelerator.scaler
        taken = {
            "step": tr.global_step,
            "adapter": tr.adapter_state(),
            "optimizer": checkpoint.snapshot(tr.raw_optimizer.state_dict()),
            "scheduler": checkpoint.snapshot(tr.raw_scheduler.state_dict()),
            "trainer_state": self.trainer_state(),
            "grad_scaler": checkpoint.snapshot(scaler.state_dict()) if scaler else None,
            "rng": torch.get_rng_state(),
        }
        self.checkpoints.submit(lambda: self._write_checkpoint(**taken))
        tr.accelerator.wait_for_everyone()

    def _write_checkpoint(self, step: int, **state: Any) -> None:
        time.sleep(self.faults.slow_checkpoint)
        folder, files = checkpoint.save(self.state_dir, self.run.run_id, step,
                                        crash_at_step=self.faults.crash_in_checkpoint, **state)
        keep = self.run_config.train.keep_checkpoints
        old = checkpoint.prunable(self.state_dir, self.run.run_id, keep)
        released = tuple(f for c in old for f in checkpoint.files_of(self.state_dir, c))
        self.journal.append(CheckpointSaved(
            run_id=self.run.run_id,
            step=step,
            path=folder.relative_to(self.state_dir).as_posix(),
            files=files,
            released=released,
        ))
        for c in old:  # only after the journal says they are released
            shutil.rmtree(c.path, ignore_errors=True)

    def resume(self) -> None:
        """Continue from the newest verified checkpoint, or note a restart from scratch."""
        run_dir = self.state_dir / "runs" / self.run.run_id
        main = self.trainer.accelerator.is_main_process  # the others only read the folder
        if main:
            checkpoint.clean_temporaries(self.state_dir, self.run.run_id)
        ckpt, skipped = checkpoint.latest_valid(self.state_dir, self.run.run_id)
        if ckpt is None:
            if main and run_dir.exists():
                why = "; ".join(skipped) or "no checkpoint was written before it stopped"
                self.journal.append(RunResumed(
                    run_id=self.run.run_id, from_step=self.run.start_step, checkpoint=None,
                    reason=f"restarted from the beginning: {why}",
                ))
            if main:
                run_dir.mkdir(parents=True, exist_ok=True)
            return
        state = ckpt.state()
        if state["run_id"] != self.run.run_id:
            raise ServiceError(f"{ckpt.path}: belongs to run {state['run_id']}")
        if state["config_digest"] != self.config_digest:
            raise ServiceError(f"{ckpt.path}: written with a different configuration")
        tr = self.trainer
        written_by = int(state.get("processes", 1))
        if written_by != tr.accelerator.num_processes:
            raise ServiceError(
                f"{ckpt.path}: written by {written_by} training process(es), resumed with "
                f"{tr.accelerator.num_processes}: set train.num_processes back to {written_by} "
                "to finish this run"
            )
        torch.set_num_threads(int(state["threads"]))
        tr.load_adapter(ckpt.adapter())
        tr.optimizer.load_state_dict(ckpt.torch_state("optimizer.pt"))
        tr.lr_scheduler.load_state_dict(ckpt.torch_state("scheduler.pt"))
        scaler_state = ckpt.grad_scaler()
        if tr.accelerator.scaler is not None and scaler_state is not None:  # fp16 on a GPU
            tr.accelerator.scaler.load_state_dict(scaler_state)
        tr.local_step = int(state["local_step"])
        tr.losses = [float(x) for x in state["losses"]]
        torch.set_rng_state(ckpt.rng())  # after the adapter was built: building it draws
        reason = "; ".join(f"skipped {s}" for s in skipped)
        if not main:
            return
        self.journal.append(RunResumed(
            run_id=self.run.run_id, from_step=ckpt.step,
            checkpoint=ckpt.path.relative_to(self.state_dir).as_posix(), reason=reason,
        ))


def execute(config: Config, journal: Journal, run_id: str, *, progress: bool = False,
            stop: StopFlag | None = None, faults: Faults | None = None) -> Outcome:
    """Train `run_id` to a version (or to a checkpoint when stopped). `faults`: tests only
    (`training/faults.py`). Where the time went is logged once at the end (`run timings`)."""
    clock = Stopwatch()
    try:
        return _execute(config, journal, run_id, clock, progress=progress,
                        stop=stop if stop is not None else StopFlag(), faults=faults)
    finally:
        log.info("run timings", run_id=run_id, seconds=clock.report())


def _execute(config: Config, journal: Journal, run_id: str, clock: Stopwatch, *,
             progress: bool, stop: StopFlag, faults: Faults | None) -> Outcome:
    run = find_run(journal, run_id)
    with heartbeat.phase():  # base model, pipeline: one slow load, nothing to beat inside
        ctx = RunContext(config, journal, run, faults, clock)
    losses = LossLog(journal, run_id, ctx.checkpoints,
                     _tensorboard(ctx) if ctx.trainer.accelerator.is_main_process else None)
    try:
        return _train(ctx, losses, progress=progress, stop=stop)
    except BaseException as exc:
        try:  # what was measured and written before the failure lands before RunFailed
            ctx.checkpoints.wait()
            losses.flush()
            losses.close_writer()
        except BaseException as also:
            if disk_trouble(also) is not None and disk_trouble(exc) is None:
                raise also from exc  # the disk's fault decides the exit status (75)
        raise


def _train(ctx: RunContext, losses: LossLog, *, progress: bool, stop: StopFlag) -> Outcome:
    journal, run, run_id, clock = ctx.journal, ctx.run, ctx.run.run_id, ctx.clock
    tr = ctx.trainer
    if tr.warmup_steps:
        _log(f"run {run_id}: learning rate warms up over {tr.warmup_steps} of "
             f"{run.total_steps} steps")
    with heartbeat.phase(), clock.phase("set-up"):
        tr.prepare()
    # the parent's loss on what it knew, before training (and before a checkpoint replaces its
    # weights), through the same prepared model as the child's: same device, same autocast
    parent_val = None
    if run.parent is not None:
        with clock.phase("parent validation"):
            parent_val = tr.validate(ctx.val_data)
    with heartbeat.phase(), clock.phase("set-up"):
        ctx.resume()
    t = ctx.run_config.train
    main = tr.accelerator.is_main_process  # only it writes the journal, logs and versions
    if progress and main:
        losses.bar = _progress_bar(run, tr.local_step)
    last_saved = tr.global_step if tr.local_step else None
    end = run.start_step + run.total_steps
    started, images = time.perf_counter(), 0
    faults = ctx.faults

    def checkpoint_now() -> None:
        nonlocal last_saved
        with clock.phase("checkpoints"):
            ctx.checkpoints.wait()  # the previous one is journaled before later loss points
            losses.flush()  # the journal shows every step the checkpoint holds
            ctx.save_checkpoint()
        last_saved = tr.global_step

    def loop_over() -> None:
        """What the loop spent outside the steps and checkpoints is `between`."""
        inside = clock.seconds["step"] + clock.seconds["host"] + clock.seconds["checkpoints"]
        clock.add("between", max(0.0, time.perf_counter() - started - (inside - before)))

    before = clock.seconds["step"] + clock.seconds["host"] + clock.seconds["checkpoints"]
    for step in tr.steps():
        clock.add("step", step.seconds - step.host_seconds)
        clock.add("host", step.host_seconds)
        while step.step == faults.hang_at_step:
            time.sleep(3600)  # no beat, no checkpoint, deaf to SIGTERM: only SIGKILL ends it
        heartbeat.beat()
        images += step.images
        if faults.step_delay:
            time.sleep(faults.step_delay)
        if main:
            losses.add(step, logged=step.step % LOSS_EVERY == 0 or step.step == end)
        if (step.step - run.start_step) % t.save_steps == 0 or step.step == end:
            checkpoint_now()
        if stop:  # each process gets the signal at its own moment: agree on the step
            tr.accelerator.set_trigger()
        if tr.accelerator.check_trigger() and step.step != end:
            if last_saved != step.step:
                checkpoint_now()
            with clock.phase("checkpoints"):
                ctx.checkpoints.wait()  # durable before the process exits
            losses.close()
            losses.close_writer()
            loop_over()
            by = stop.signal or "sent to another process"
            _log(f"run {run_id}: stopped by signal {by} at step {step.step}; checkpoint saved")
            return Outcome(STOPPED, step.step)
    if last_saved != tr.global_step:  # e.g. resumed from the final checkpoint: nothing to save
        checkpoint_now()
    losses.close()
    loop_over()
    elapsed = time.perf_counter() - started
    if images:
        _log(f"run {run_id}: {tr.local_step} steps, {images / max(elapsed, 1e-9):.1f} images/s")

    with clock.phase("validation"):
        val = _validation(ctx, tr.validate(ctx.val_data), parent_val)
    if losses.writer is not None and val["val_loss"] is not None:
        losses.writer.add_scalar(f"{run_id}/val_loss", val["val_loss"], tr.global_step)
    losses.close_writer()
    with clock.phase("checkpoints"):
        ctx.checkpoints.wait()  # the last one was written while validating
    with heartbeat.phase():  # exporting, publishing and sampling call into other packages
        with clock.phase("publishing"):
            version = publish(ctx, val) if main else None
        if version is not None and ctx.config.samples.enabled:
            # samples never fail the run: render_samples journals its own errors
            unwrap = tr.accelerator.unwrap_model
            with clock.phase("samples"):
                render_samples(
                    journal, ctx.config, version,
                    unet=unwrap(tr.unet, keep_fp32_wrapper=False),
                    text_encoder=(unwrap(tr.text_encoder, keep_fp32_wrapper=False)
                                  if tr.train_text else ctx.train_data.text_encoder),
                    vae=ctx.train_data.vae, tokenizer=ctx.train_data.tokenizer,
                    scheduler=tr.noise_scheduler,
                )
    return Outcome(FINISHED, tr.global_step, version, val)


def _validation(ctx: RunContext, losses: list[float],
                parent_val: list[float] | None) -> dict[str, Any]:
    """The version's validation losses, with the parent's on the batches it knew."""
    val = _val_losses(ctx.val_data.items, losses, ctx.parent_known)
    val["parent_val_loss_known"], val["parent_val_loss_per_batch"] = None, {}
    if parent_val is not None:  # the gate compares each batch the parent knew on its own too
        before = _val_losses(ctx.val_data.items, parent_val, ctx.parent_known)
        val["parent_val_loss_known"] = before["val_loss_known"]
        val["parent_val_loss_per_batch"] = {
            b: v for b, v in before["val_loss_per_batch"].items() if b in ctx.parent_known}
    return val


class LossLog:
    """The loss as the run goes: `LossLogged` every LOSS_EVERY steps, journaled together at most
    once per FLUSH_EVERY_S (one durable commit, not one per point), and before every checkpoint
    and at the end — never while a checkpoint is being written, so its `CheckpointSaved` comes
    before the points of later steps; the same points go to the log, TensorBoard and the
    progress bar. Only the logged steps read the loss from the device."""

    def __init__(self, journal: Journal, run_id: str, checkpoints: checkpoint.Writer,
                 writer: Any) -> None:
        self.journal, self.run_id, self.checkpoints = journal, run_id, checkpoints
        self.writer: Any = writer
        self.bar: Any = None
        self.pending: list[LossLogged] = []
        self.flushed = time.monotonic()

    def add(self, step: Step, *, logged: bool) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if not logged:
            return
        loss, rate = step.loss, round(step.images_per_s, 2)
        self.pending.append(LossLogged(run_id=self.run_id, step=step.step, loss=loss,
                                       lr=step.lr, images_per_s=rate))
        log.info("step", run_id=self.run_id, step=step.step, loss=round(loss, 6), lr=step.lr,
                 images_per_s=rate)
        if self.writer is not None:
            for name, value in (("loss", loss), ("lr", step.lr), ("images_per_s", rate)):
                self.writer.add_scalar(f"{self.run_id}/{name}", value, step.step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{step.lr:.2e}", img_s=f"{rate:.1f}")
        if time.monotonic() - self.flushed >= FLUSH_EVERY_S and not self.checkpoints.busy:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.journal.append(*self.pending)
            self.pending = []
        self.flushed = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def train_loss(losses: list[float], steps_per_epoch: int) -> float | None:
    """Mean training loss over the run's last epoch of steps."""
    tail = losses[-max(1, steps_per_epoch):]
    return _mean(tail)


def publish(ctx: RunContext, val: dict[str, Any]) -> str:
    """Hand the trained adapter and what the run measured to `versions.publish`."""
    tr = ctx.trainer
    run = queries.run(ctx.journal, ctx.run.run_id) or {}
    adapter = TrainedAdapter(
        tr.accelerator.unwrap_model(tr.unet),
        tr.accelerator.unwrap_model(tr.text_encoder) if tr.train_text else None,
    )
    measured = Measured(
        step=tr.global_step,
        steps=ctx.run.total_steps,
        epochs=tr.epochs_trained(ctx.run.total_steps),  # less than planned under max_steps
        train_loss=train_loss(tr.loss_history(), tr.steps_per_epoch),
        images=len(ctx.train_data),
        validation_images=len(ctx.val_data),
        manifest=manifest(ctx.journal, ctx.train_data.items),
        started_at=run.get("started_at") or utc_now(),
        finished_at=utc_now(),
        **val,
    )
    return publish_version(ctx.journal, ctx.config, ctx.run.run_id, adapter, measured)


def manifest(journal: Journal, items: list[Item]) -> dict[str, str]:
    """Every image and caption file trained on (state-relative path -> sha256)."""
    out: dict[str, str] = {}
    for item in items:
        out[f"batches/{item.batch_id}/{item.file}"] = item.sha256
        stem = item.file.rsplit(".", 1)[0]
        caption = f"batches/{item.batch_id}/{stem}.txt"
        sha = queries.live_file(journal, caption)
        if sha is not None:
            out[caption] = sha
    return dict(sorted(out.items()))


def _log(message: str) -> None:
    log.info(message)


def _progress_bar(run: RunStarted, done: int) -> Any:
    return tqdm(total=run.total_steps, initial=done, desc=f"run {run.run_id}", unit="step",
                dynamic_ncols=True)


def _tensorboard(ctx: RunContext) -> Any:
    if not ctx.config.logging.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    folder = ctx.state_dir / "logs" / "tensorboard"
    folder.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(folder), filename_suffix=f".{ctx.run.run_id}.{os.getpid()}")


def summary(outcome: Outcome) -> str:
    return json.dumps({"status": outcome.status, "step": outcome.step,
                       "version": outcome.version, **outcome.val}, sort_keys=True)
