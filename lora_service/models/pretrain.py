"""Pretrain `builtin:shapes-sd` and its judge on the procedural world, from a seed, offline.

    .venv/bin/python -m lora_service.models.pretrain --out DIR [--scale 1.0] [--judge-only]

1. The world's base part (`world.BASE_SHAPES`, solid, every colour and background) is drawn at
   64 px. 2. The VAE learns to reconstruct it (MSE + a small KL term); its latents' std sets
   `scaling_factor`. 3. The UNet learns epsilon prediction on those latents, conditioned on the
   frozen random text encoder's embedding of each caption (10 % empty captions, for
   classifier-free guidance). 4. The judge learns shape, colour and style from the whole world
   (new shapes and the hollow style included), half of it seen through the VAE (a decoder's
   softness, as generated images have it). 5. The model draws one sample per base prompt and the
   judge scores them; the report goes to `report.json`. Weights are written in fp16 safetensors
   with their sha256 (paste `WEIGHTS` into `shapes_sd.py`).

Seeded throughout: a rerun with the same torch, Pillow, thread count and CPU gives the same
bytes (the judge stage rerun with `--judge-only` reproduced judge.safetensors exactly); other
CPUs or thread counts may differ in the last bits of float sums.

    .venv/bin/python -m lora_service.models.pretrain --out lora_service/models/weights/shapes-sd
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lora_service.models.torch_compat  # noqa: F401  (must precede diffusers)

# isort: split
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from lora_service import world
from lora_service.models import judge, shapes_sd
from lora_service.models.base_model import clip_tokenizer, shapes_sd_modules, shapes_text_encoder
from lora_service.store import sha256_file

PX = shapes_sd.RESOLUTION


def draw(scenes: list[world.Scene]) -> torch.Tensor:
    """Scenes as a uint8 N x 3 x PX x PX tensor."""
    return torch.from_numpy(np.stack([np.asarray(s.draw(PX)) for s in scenes])).permute(0, 3, 1, 2)


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def embed(captions: list[str]) -> dict[str, torch.Tensor]:
    """Each distinct caption's last hidden state (77 x hidden)."""
    tok, te = clip_tokenizer(), shapes_text_encoder()
    unique = sorted(set(captions))
    ids = tok(unique, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids)[0]
    return dict(zip(unique, hidden, strict=True))


def fit(name: str, module: torch.nn.Module, loss_of: Callable[[], torch.Tensor], steps: int,
        log: Any, *, lr: float, weight_decay: float, pct_start: float = 0.3,
        clip: float | None = 1.0) -> None:
    """AdamW on a one-cycle schedule: the loop the VAE, the UNet and the judge share."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=pct_start)
    for step in range(steps):
        loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} {step}/{steps} loss {loss.item():.4f}")


def train_vae(images: torch.Tensor, steps: int, batch: int, log: Any) -> AutoencoderKL:
    torch.manual_seed(shapes_sd.SEED)
    vae = AutoencoderKL(**shapes_sd.VAE)
    gen = torch.Generator().manual_seed(shapes_sd.SEED)

    def loss() -> torch.Tensor:
        x = as_float(images[torch.randint(0, len(images), (batch,), generator=gen)])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        return F.mse_loss(vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()

    fit("vae", vae, loss, steps, log, lr=1e-3, weight_decay=0.0, pct_start=0.05)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in images.split(256):
        dist = vae.encode(as_float(chunk)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(mean: torch.Tensor, std: torch.Tensor, cond: torch.Tensor, empty: torch.Tensor,
               steps: int, batch: int, log: Any) -> UNet2DConditionModel:
    torch.manual_seed(shapes_sd.SEED)
    unet = UNet2DConditionModel(**shapes_sd.UNET)
    noise_scheduler = DDPMScheduler(**shapes_sd.SCHEDULER)
    gen = torch.Generator().manual_seed(shapes_sd.SEED + 1)

    def loss() -> torch.Tensor:
        idx = torch.randint(0, len(mean), (batch,), generator=gen)
        latents = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        c = cond[idx].clone()
        c[torch.rand(batch, generator=gen) < 0.1] = empty  # for classifier-free guidance
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        return F.mse_loss(unet(noise_scheduler.add_noise(latents, noise, t), t, c).sample, noise)

    fit("unet", unet, loss, steps, log, lr=1e-3, weight_decay=0.01, pct_start=0.05)
    return unet.eval().requires_grad_(False)


def train_judge(images: torch.Tensor, labels: dict[str, torch.Tensor], steps: int, batch: int,
                log: Any) -> judge.Net:
    torch.manual_seed(shapes_sd.SEED + 2)
    net = judge.Net()
    gen = torch.Generator().manual_seed(shapes_sd.SEED + 3)

    def loss() -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx] + 0.03 * torch.randn(images[idx].shape, generator=gen)  # sampler noise
        out = net(x)
        return torch.stack([F.cross_entropy(out[k], labels[k][idx]) for k in judge.HEADS]).sum()

    fit("judge", net, loss, steps, log, lr=3e-3, weight_decay=1e-4, clip=None)
    return net.eval()


def judge_labels(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    return {
        "shape": torch.tensor([judge.HEADS["shape"].index(s.shape) for s in scenes]),
        "colour": torch.tensor([judge.HEADS["colour"].index(s.colour) for s in scenes]),
        "hollow": torch.tensor([int(s.hollow) for s in scenes]),
    }


@torch.no_grad()
def accuracy(net: judge.Net, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict:
    out = net(images)
    return {k: round(float((out[k].argmax(1) == labels[k]).float().mean()), 4) for k in judge.HEADS}


@torch.no_grad()
def roundtrip(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.decode(vae.encode(as_float(c)).latent_dist.mean).sample.clamp(-1, 1)
                      for c in images.split(256)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to write (the shipped one: lora_service/models/weights/"
                             "shapes-sd; then paste WEIGHTS and SCALING_FACTOR into shapes_sd.py)")
    parser.add_argument("--scale", type=float, default=1.0, help="steps x this (a quick try)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--judge-only", action="store_true",
                        help="keep the UNet and VAE in --out; train the judge again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:7.1f} s] {message}", flush=True)

    def steps(n: int) -> int:
        return max(1, round(n * args.scale))

    if args.judge_only:
        unet, vae = shapes_sd_modules(args.out, check=False)
    else:
        unet, vae = train_models(steps, log)

    every = world.scenes(8000, seed=shapes_sd.SEED + 10, shapes=world.SHAPES, hollow=None)
    judge_images = as_float(draw(every))
    half = len(every) // 2
    judge_images[half:] = roundtrip(vae, draw(every[half:]))
    labels = judge_labels(every)
    net = train_judge(judge_images, labels, steps(4000), 64, log)
    held = world.scenes(1000, seed=shapes_sd.SEED + 20, shapes=world.SHAPES, hollow=None)
    held_images = draw(held)
    held_labels = judge_labels(held)
    report: dict[str, Any] = {
        "judge_accuracy_drawn": accuracy(net, as_float(held_images), held_labels),
        "judge_accuracy_through_vae": accuracy(net, roundtrip(vae, held_images), held_labels),
    }
    log(f"judge: {report}")
    report["samples"] = sample_report(unet, vae, net, log)
    report["seconds"] = round(time.monotonic() - began, 1)
    if args.judge_only:  # the models' own training time stays on record
        before = json.loads((args.out / "report.json").read_text())
        report = {**before, **report, "seconds": before["seconds"],
                  "judge_only_seconds": report["seconds"]}
    save(args.out, unet, vae, net, report, args.judge_only)
    log(f"wrote {args.out}: {json.dumps(report)}")


def train_models(steps: Any, log: Any) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    base = world.scenes(6000, seed=shapes_sd.SEED)
    images = draw(base)
    log(f"drew {len(base)} base scenes")
    vae = train_vae(images, steps(1500), 16, log)
    mean, std = encode(vae, images)
    vae.register_to_config(scaling_factor=round(float(1 / mean.std()), 5))
    scale = vae.config.scaling_factor
    captions = [s.caption for s in base]
    table = embed([*captions, ""])
    cond = torch.stack([table[c] for c in captions])
    unet = train_unet(mean * scale, std * scale, cond, table[""], steps(3000), 32, log)
    return unet, vae


@torch.no_grad()
def sample_report(unet: Any, vae: Any, net: judge.Net, log: Any) -> dict[str, Any]:
    """One sample per base prompt (3 shapes x 6 colours x 3 backgrounds, minus clashes) with the
    product's sampler settings; the judge's share of right shapes and colours."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=shapes_text_encoder(), tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler.from_config(shapes_sd.SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = [world.Scene(s, c, b).caption for s in world.BASE_SHAPES for c in world.COLOURS
               for b in world.BACKGROUNDS if not world._clash(c, b)]
    images = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(i)
        images += pipe(prompt, num_inference_steps=20, guidance_scale=4.0, generator=gen,
                       height=PX, width=PX).images
    marks = judge.Judge(net).score(images, prompts)
    out = {k: round(sum(m[k] for m in marks) / len(marks), 4) for k in ("concept", "colour")}
    log(f"samples: {out} over {len(prompts)} prompts")
    return {**out, "prompts": len(prompts)}


def save(out: Path, unet: Any, vae: Any, net: judge.Net, report: dict[str, Any],
         judge_only: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, module in () if judge_only else (("unet", unet), ("vae", vae)):
        save_file({k: v.half().contiguous() for k, v in module.state_dict().items()},
                  out / f"{name}.safetensors")
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in net.state_dict().items()}, out / "judge.safetensors")
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    hashes = {p.name: sha256_file(p) for p in sorted(out.glob("*.safetensors"))}
    print("WEIGHTS =", json.dumps(hashes, indent=4))
    print("SCALING_FACTOR =", vae.config.scaling_factor)


if __name__ == "__main__":
    main()
