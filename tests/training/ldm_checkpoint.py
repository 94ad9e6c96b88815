"""Make single-file SD 1.x checkpoints (original `ldm` key names) for tests.

Nothing on this machine holds a real SD 1.x `.safetensors` file, and diffusers ships only the
other direction (`diffusers.loaders.single_file_utils`: original -> diffusers). This renames
a diffusers model's keys to the original layout; test_single_file.py proves it is the exact
inverse of diffusers' own converters, so a file made here is what a user would download.
"""

from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                 "to_out.0": "proj_out"}


def _rename(key: str, table: dict[str, str]) -> str:
    head, _, leaf = key.rpartition(".")  # leaf: weight / bias
    for new, old in table.items():
        if head == new:
            return f"{old}.{leaf}"
    return key


def unet_keys(config: Any) -> dict[str, str]:
    """diffusers UNet2DConditionModel name prefix -> original name prefix."""
    per = config["layers_per_block"]
    down = config["down_block_types"]
    out = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i, kind in enumerate(down):
        for j in range(per):
            n = 1 + i * (per + 1) + j
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if kind.startswith("CrossAttn"):
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i < len(down) - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per + 1)}.0.op"
    for i, kind in enumerate(config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for j in range(per + 1):
            n = i * (per + 1) + j
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            if attention:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
        if i < len(down) - 1:
            n = i * (per + 1) + per
            out[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{n}.{2 if attention else 1}"
    return out


def vae_keys(config: Any) -> dict[str, str]:
    """diffusers AutoencoderKL name prefix -> original name prefix."""
    blocks = len(config["down_block_types"])
    per = config["layers_per_block"]
    out = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        out[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        out[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        out[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(blocks):
        for j in range(per):
            out[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        out[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        k = blocks - 1 - i  # the decoder's up blocks are numbered from the bottom
        for j in range(per + 1):
            out[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{k}.block.{j}"
        out[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{k}.upsample"
    return out


def _apply(state: dict[str, torch.Tensor], prefixes: dict[str, str],
           inner: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    longest_first = sorted(prefixes, key=len, reverse=True)
    for key, value in state.items():
        name = key
        for new in longest_first:
            if key.startswith(new + "."):
                rest = key[len(new) + 1:]
                name = f"{prefixes[new]}.{_rename(rest, inner)}"
                break
        out[name] = value
    return out


def to_ldm(unet: Any, vae: Any, text_encoder: Any,
           dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One original-layout state dict for the three models (as SD 1.x files are saved)."""
    ckpt: dict[str, torch.Tensor] = {}
    for key, value in _apply(unet.state_dict(), unet_keys(unet.config), RESNET).items():
        ckpt[UNET_PREFIX + key] = value
    vae_state = _apply(vae.state_dict(), vae_keys(vae.config),
                       {"conv_shortcut": "nin_shortcut", **VAE_ATTENTION})
    for key, value in vae_state.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # the original's attention is 1x1 convolutions
        ckpt[VAE_PREFIX + key] = value
    for key, value in text_encoder.state_dict().items():
        ckpt[TEXT_PREFIX + key] = value
    return {k: v.detach().to(dtype).contiguous() for k, v in ckpt.items()}
