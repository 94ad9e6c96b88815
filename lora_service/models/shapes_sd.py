"""`builtin:shapes-sd`: the embedded model that draws — its architecture and shipped weights.

The Stable Diffusion 1.x layout at toy size: a x8 AutoencoderKL, a UNet2DCondition with
cross-attention at both levels, and a frozen 2-layer CLIP text encoder with the real CLIP
tokenizer, rebuilt from `SEED` rather than shipped (it is random: its 49,408-word embedding would
be most of the download). The UNet and VAE were pretrained by `python -m
lora_service.models.pretrain` on the base part of `lora_service.world` (three solid shapes, six
colours, three backgrounds) and ship in `weights/shapes-sd/` as fp16 safetensors, next to the
judge (`models.judge`). `WEIGHTS` holds their sha256: a changed file is refused, not used; the
configs are these dicts (with `SCALING_FACTOR`), not files beside the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_service.models import tiny_sd

SEED = 1
RESOLUTION = 64
WEIGHTS_DIR = Path(__file__).with_name("weights") / "shapes-sd"

UNET: dict[str, Any] = {
    **tiny_sd.UNET,
    "sample_size": RESOLUTION // 8,
    "block_out_channels": (64, 128),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
}

VAE: dict[str, Any] = {
    **tiny_sd.VAE,
    "sample_size": RESOLUTION,
    "norm_num_groups": 16,
    "scaling_factor": 1.0,  # pretrain.py measures it: 1 / std of the world's latents
}
SCALING_FACTOR = 0.71335  # what pretrain.py measured for the shipped VAE

TEXT_ENCODER: dict[str, Any] = {
    **tiny_sd.TEXT_ENCODER,
    "hidden_size": 64,
    "intermediate_size": 128,
    "projection_dim": 64,
}

SCHEDULER: dict[str, Any] = dict(tiny_sd.SCHEDULER)

# file name -> sha256 of what pretrain.py wrote (checked when the builtin is materialised)
WEIGHTS: dict[str, str] = {
    "judge.safetensors": "7be411e99c2ee570e49eec66cb39995d01bee90e72369310de5c179b9075d1b8",
    "unet.safetensors": "d7f6462c144490b54946f2cc2094d9575b848efd26e0423bbfcec8d75593267b",
    "vae.safetensors": "7aee6f5216777a6e3aba47092be2b8c4dc5e3c74624a4a70a7687293de772b61",
}
