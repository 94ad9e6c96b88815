"""The training loop: plain and readable, every step a pure function of (seed, step).

1. The UNet is frozen and peft LoRA layers are added to `lora.target_modules` (optionally the
   text encoder's attention projections too). A fresh lineage seeds the LoRA init from the run's
   seed; an incremental run loads its parent version's adapter instead.
2. accelerate handles mixed precision (and, launched through `accelerate launch`, several
   processes). Gradient accumulation is ours: an optimizer step takes `gradient_accumulation_steps`
   micro-batches of one epoch, the epoch's last step takes what is left, so an epoch is one pass
   over the data and a run of E epochs takes E x ceil(micro-batches / accumulation) steps, as
   diffusers' train_text_to_image_lora.py and kohya's train_network.py count them
   (`num_update_steps_per_epoch`). A step's gradient is the mean over its micro-batches.
3. The data order of epoch e is `randperm` from a generator seeded by (seed, e); the noise and
   timesteps of micro-batch m are drawn from a generator seeded by (seed, global step, m). No step
   depends on RNG state left behind by an earlier step, so a resumed run needs only the adapter,
   optimizer, LR scheduler, fp16 grad scaler and step to continue bit-identically (the torch RNG
   state is saved and restored anyway, after the adapter is built, for anything a library draws).
4. Validation uses its own fixed generator per image and fixed timesteps, and always runs on the
   prepared model (same device, same autocast), so the losses of a parent and its child compare.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lora_service.models.torch_compat  # noqa: F401  (must precede peft/diffusers)

# isort: split
import torch
import torch.nn.functional as F  # noqa: N812
from accelerate import Accelerator, DataLoaderConfiguration
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from lora_service.config import Config
from lora_service.errors import ServiceError
from lora_service.journal.events import RunStarted
from lora_service.training import heartbeat
from lora_service.training.data import EncodedData

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_PREFIX = "text_encoder."
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)


def pure_seed(*parts: object) -> int:
    """A 63-bit seed from any parts: the same parts give the same seed on every machine."""
    blob = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(pure_seed(*parts))


@dataclass(frozen=True)
class Step:
    step: int  # global step after this optimizer step
    loss_tensor: torch.Tensor  # mean over the step's micro-batches (and processes), 0-dim
    lr: float
    images: int  # images seen in this step
    seconds: float  # the step, wall clock
    host_seconds: float  # of which the step's own Python: batch, generator, bookkeeping

    @property
    def loss(self) -> float:
        """The loss as a number: reading it waits for the step (a device sync), so only the
        steps that are logged read it."""
        return float(self.loss_tensor.item())

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class Trainer:
    """One run's training state: LoRA-wrapped models, optimizer, LR schedule, position."""

    def __init__(
        self,
        config: Config,
        run: RunStarted,
        data: EncodedData,
        unet: Any,
        noise_scheduler: Any,
        *,
        text_encoder: Any = None,
        parent_adapter: Path | None = None,
        warmup_steps: int | None = None,
    ) -> None:
        """`warmup_steps`: this run's warmup (`Train.warmup_for`); by default the run's own
        share as if it were its lineage's first run."""
        self.config, self.run, self.data = config, run, data
        self.unet, self.text_encoder, self.noise_scheduler = unet, text_encoder, noise_scheduler
        lora = config.lora
        t = config.train
        self.train_text = lora.train_text_encoder
        self.micro = t.gradient_accumulation_steps
        self.batch_size = t.batch_size
        # without CUDA, `accelerate launch --multi_gpu` gives several CPU processes (gloo);
        # split_batches: each process takes a share of one batch (see `steps`), so the LR
        # schedule steps once per optimizer step, not once per process
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(
            cpu=several and not torch.cuda.is_available(),
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            mixed_precision=t.mixed_precision,
        )

        # 1. LoRA layers. Adding them draws random numbers (kaiming init of lora_A), so the
        #    init is seeded from the run, and a resumed run restores the RNG only after this.
        unet.requires_grad_(False)
        if text_encoder is not None:
            text_encoder.requires_grad_(False)
        torch.manual_seed(pure_seed(run.seed, "lora-init"))
        unet.add_adapter(
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                target_modules=list(lora.target_modules),
                init_lora_weights="gaussian",
            )
        )
        if self.train_text:
            text_encoder.add_adapter(
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    target_modules=list(TEXT_TARGETS),
                    init_lora_weights="gaussian",
                )
            )
        if parent_adapter is not None:
            self.load_adapter(load_file(parent_adapter))
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

        # 2. Optimizer and LR schedule over this run's steps only.
        params = [p for p in unet.parameters() if p.requires_grad]
        if self.train_text:
            params += [p for p in text_encoder.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=run.learning_rate)
        if warmup_steps is None:
            warmup_steps = t.warmup_for(run.total_steps, run.total_steps)
        self.warmup_steps = warmup_steps
        self.lr_scheduler = get_scheduler(
            t.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=run.total_steps,
        )
        self.local_step = 0  # optimizer steps done in this run
        self.losses: list[float] = []  # one per optimizer step read so far, in checkpoints
        self._unread: list[torch.Tensor] = []  # the steps' losses not yet read from the device

    # -- adapter ------------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights: UNet keys as peft gives them, text encoder keys prefixed."""
        unet = self.accelerator.unwrap_model(self.unet)
        out = {k: v.detach().clone().contiguous() for k, v in
               get_peft_model_state_dict(unet).items()}
        if self.train_text:
            te = self.accelerator.unwrap_model(self.text_encoder)
            for k, v in get_peft_model_state_dict(te).items():
                out[TEXT_PREFIX + k] = v.detach().clone().contiguous()
        return out

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        """Load LoRA weights, before or after `prepare` (into the model inside any wrapper)."""
        unwrap = self.accelerator.unwrap_model
        unet_state = {k: v for k, v in state.items() if not k.startswith(TEXT_PREFIX)}
        _load_into(unwrap(self.unet), unet_state, "UNet")
        if self.train_text:
            te_state = {k[len(TEXT_PREFIX):]: v for k, v in state.items()
                        if k.startswith(TEXT_PREFIX)}
            _load_into(unwrap(self.text_encoder), te_state, "text encoder")

    # -- the loop -----------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        return self.run.start_step + self.local_step

    @property
    def micro_per_epoch(self) -> int:
        """Micro-batches in one pass over the data (the last one may hold fewer images)."""
        return math.ceil(len(self.data) / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; `plan.steps_for` counts the same."""
        return math.ceil(self.micro_per_epoch / self.micro)

    def window(self, local_step: int) -> tuple[int, range]:
        """(epoch, positions in the epoch's micro-batch order) of this run's optimizer step
        `local_step` (0-based): never more than one epoch."""
        epoch, k = divmod(local_step, self.steps_per_epoch)
        first = k * self.micro
        return epoch, range(first, min(first + self.micro, self.micro_per_epoch))

    def epochs_trained(self, steps: int) -> int:
        """Epochs that `steps` optimizer steps of this run reach into (the last may be cut
        short by `max_steps`): what kohya's `ss_epoch` says."""
        return math.ceil(steps / self.steps_per_epoch)

    def order(self, epoch: int) -> list[int]:
        """The data order of an epoch: a pure function of the seed and the epoch."""
        n = len(self.data)
        return torch.randperm(n, generator=generator(self.run.seed, "order", epoch)).tolist()

    def micro_batch(self, epoch: int, pos: int) -> list[int]:
        """Item indices of micro-batch `pos` of `epoch`, all processes together."""
        return self.order(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]

    def prepare(self) -> None:
        """Hand models and optimizer to accelerate (a checkpoint may be loaded before or after)."""
        self.raw_optimizer, self.raw_scheduler = self.optimizer, self.lr_scheduler
        prepared = self.accelerator.prepare(self.unet, self.optimizer, self.lr_scheduler)
        self.unet, self.optimizer, self.lr_scheduler = prepared
        if self.train_text:
            self.text_encoder = self.accelerator.prepare(self.text_encoder)

    def _loss(self, latents: torch.Tensor, cond: torch.Tensor, gen: torch.Generator,
              timesteps: torch.Tensor | None = None) -> torch.Tensor:
        # drawn on the CPU whatever the device, so noise is the same on every machine
        noise = torch.randn(latents.shape, generator=gen)
        if timesteps is None:
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                generator=gen,
            )
        device = self.params[0].device  # before `prepare` (parent validation) still the CPU
        latents, cond, noise = latents.to(device), cond.to(device), noise.to(device)
        timesteps = timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.train_text:
            cond = self.text_encoder(cond)[0]
        pred = self.unet(noisy, timesteps, cond).sample
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")

    def steps(self) -> Iterator[Step]:
        """Run the remaining optimizer steps, yielding after each one. Nothing here waits for
        the device: the loss stays a tensor until someone reads it (`Step.loss`)."""
        self.unet.train()
        models = [self.unet, self.text_encoder] if self.train_text else [self.unet]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        while self.local_step < self.run.total_steps:
            started = time.perf_counter()
            compute = 0.0  # forward, backward, optimizer: the rest of the step is host work
            losses, images = [], 0
            epoch, window = self.window(self.local_step)
            order = self.order(epoch)
            for j, pos in enumerate(window):
                indices = order[pos * self.batch_size : (pos + 1) * self.batch_size]
                # under `accelerate launch`, each process takes its share of the micro-batch
                # (one item at least: every process must step, so a short tail repeats one)
                mine = indices[rank::world] or [indices[rank % len(indices)]]
                latents, cond = self.data.batch(mine)
                # noise and timesteps: drawn from (seed, global step, micro-batch) alone
                gen = generator(self.run.seed, "noise", self.global_step + 1, j, rank)
                mark = time.perf_counter()
                with contextlib.ExitStack() as stack:
                    if j < len(window) - 1:  # processes average gradients once, on the last
                        for model in models:
                            stack.enter_context(self.accelerator.no_sync(model))
                    loss = self._loss(latents, cond, gen)
                    self.accelerator.backward(loss / len(window))
                compute += time.perf_counter() - mark
                losses.append(loss.detach())
                images += len(indices)
            mark = time.perf_counter()
            self.accelerator.clip_grad_norm_(self.params, self.config.train.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            compute += time.perf_counter() - mark
            mean = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
            if world > 1:
                mean = self.accelerator.reduce(mean, "mean")
            lr = self.lr_scheduler.get_last_lr()[0]
            self.local_step += 1
            if self.accelerator.is_main_process:  # the one that logs and checkpoints
                self._unread.append(mean)
            elapsed = time.perf_counter() - started
            yield Step(self.global_step, mean, lr, images, elapsed, max(0.0, elapsed - compute))

    def loss_history(self) -> list[float]:
        """The mean loss of every optimizer step of this run so far (one device sync)."""
        if self._unread:
            self.losses += torch.stack(self._unread).float().cpu().tolist()
            self._unread = []
        return list(self.losses)  # a copy: a checkpoint being written holds the one it took

    # -- validation ---------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, data: EncodedData) -> list[float]:
        """Loss per item with fixed noise per (image, timestep): comparable across versions."""
        self.unet.eval()
        out = []
        for i, item in enumerate(data.items):
            latents, cond = data.batch([i])
            latents = latents.repeat(len(VALIDATION_TIMESTEPS), 1, 1, 1)
            cond = cond.repeat(len(VALIDATION_TIMESTEPS), *([1] * (cond.dim() - 1)))
            timesteps = torch.tensor(VALIDATION_TIMESTEPS, dtype=torch.long)
            gen = generator("validation", item.sha256)
            out.append(self._loss(latents, cond, gen, timesteps).item())
            heartbeat.beat()
        self.unet.train()
        return out


def check_precision(mixed_precision: str) -> None:
    """Refuse fp16 without a CUDA GPU: accelerate would silently train in fp32 on the CPU
    (it autocasts only bf16 there), and the run would claim a precision it never used."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ServiceError(
            "train.mixed_precision: fp16 needs a CUDA GPU and this machine has none (on the "
            "CPU it would silently train in fp32); set bf16 or no"
        )


def _load_into(model: Any, state: dict[str, torch.Tensor], what: str) -> None:
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    missing = [k for k in (getattr(result, "missing_keys", None) or []) if "lora_" in k]
    if unexpected or missing:
        raise ServiceError(
            f"adapter does not fit the {what}: {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:1]}), {len(missing)} missing LoRA keys (e.g. {missing[:1]})"
        )
