"""Every key of our kohya file for a real-size SD 1.x, UNet and text encoder, is one that kohya's
sd-scripts, ComfyUI and AUTOMATIC1111 load: no key is left over by any of them.

The key list is built the way a version's file is (`adapters.to_kohya` over peft's state dict),
for the SD 1.5 geometry shipped in the package (`training/sd15`, the configs a single-file base
is loaded against), on the meta device: names and shapes, no weights.

The accepted names below are written from reading each loader's key mapping; they are our
description of it, not their code:

- kohya-ss/sd-scripts, `networks/lora.py`: `create_network_from_weights` builds a `LoRANetwork`
  whose `create_modules` names every Linear/Conv2d inside the target classes
  `prefix + "." + module path`, dots as underscores (`lora_unet`, and `lora_te` for the one SD 1.x
  text encoder; `lora_te1`/`lora_te2` are SDXL's), then `load_state_dict(strict=False)`: a key
  for any other name is silently dropped. Targets: `Transformer2DModel` (and, when loading from
  weights, `ResnetBlock2D`, `Downsample2D`, `Upsample2D`) in its SD 1.x UNet
  (`library/original_unet.py`, diffusers' module names), and `CLIPAttention`/`CLIPMLP` in
  transformers 4's `CLIPTextModel` (sd-scripts pins transformers 4), whose paths start
  `text_model.encoder.layers.N`. conv_in, conv_out, time_embedding and the norms are in none.
- comfyanonymous/ComfyUI, `comfy/lora.py`: `model_lora_keys_unet` maps `lora_unet_` + every
  diffusers UNet weight name from `comfy/utils.py` `unet_to_diffusers` (resnets, attentions,
  transformer blocks, samplers, conv_in/out, time embedding, norms), dots as underscores;
  `model_lora_keys_clip` maps `lora_te_text_model_encoder_layers_{N}_{part}` (and `lora_te1_…`
  for clip_l) with `part` from `LORA_CLIP_MAP`: `self_attn_{q,k,v,out}_proj`, `mlp_fc1`,
  `mlp_fc2`. `load_lora` reads `.lora_up.weight`, `.lora_down.weight`, `.alpha`.
- AUTOMATIC1111/stable-diffusion-webui, `extensions-builtin/Lora/networks.py`:
  `convert_diffusers_name_to_compvis` turns `lora_unet_{down,mid,up}_block(s)_…` into the LDM
  `diffusion_model_input_blocks_{1+3i+j}_{0|1}_…` / `middle_block_…` / `output_blocks_{3i+j}_…`
  names (resnet parts renamed: conv1 → in_layers_2, conv2 → out_layers_3, time_emb_proj →
  emb_layers_1, conv_shortcut → skip_connection, norms), samplers to `…_0_op` / `…_conv`, and
  `lora_te_text_model_encoder_layers_N_…` into `transformer_text_model_encoder_layers_N_…`;
  a name that is no module of the loaded SD 1.x model (`network_layer_mapping`) is skipped
  ("didn't match keys"). So the block indices must be ones SD 1.x has: attentions in down
  blocks 0-2, up blocks 1-3 and the mid block. `network_lora.py` reads the same three parts.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import lora_service.models.torch_compat  # noqa: F401

# isort: split
import torch

from lora_service.models import adapters
from lora_service.versions import metadata

# -- the SD 1.x module names each tool loads ---------------------------------------------------

_ATTENTION = (
    r"(down_blocks_[0-2]_attentions_[01]|mid_block_attentions_0|up_blocks_[1-3]_attentions_[0-2])"
)
_TRANSFORMER_LINEAR = (
    r"(proj_in|proj_out|transformer_blocks_0_(attn[12]_to_(q|k|v|out_0)|ff_net_0_proj|ff_net_2))"
)
_TRANSFORMER_NORM = r"(norm|transformer_blocks_0_norm[1-3])"
_RESNET = r"(down_blocks_[0-3]_resnets_[01]|mid_block_resnets_[01]|up_blocks_[0-3]_resnets_[0-2])"
_RESNET_LAYER = r"(conv1|conv2|time_emb_proj|conv_shortcut)"
_SAMPLER = r"(down_blocks_[0-2]_downsamplers_0_conv|up_blocks_[0-2]_upsamplers_0_conv)"
_TOP = r"(conv_in|conv_out|time_embedding_linear_[12])"
_LAYER = r"([0-9]|1[01])"  # SD 1.x's CLIP ViT-L/14 text encoder has 12 layers
_CLIP_PART = r"(self_attn_(q|k|v|out)_proj|mlp_fc[12])"

ACCEPTED: dict[str, list[str]] = {
    # networks/lora.py: Linear/Conv2d children of the target classes only
    "kohya sd-scripts": [
        rf"lora_unet_{_ATTENTION}_{_TRANSFORMER_LINEAR}",
        rf"lora_unet_{_RESNET}_{_RESNET_LAYER}",
        rf"lora_unet_{_SAMPLER}",
        rf"lora_te_text_model_encoder_layers_{_LAYER}_{_CLIP_PART}",
    ],
    # comfy/lora.py: every diffusers UNet weight; CLIP parts of LORA_CLIP_MAP
    "ComfyUI": [
        rf"lora_unet_{_ATTENTION}_({_TRANSFORMER_LINEAR}|{_TRANSFORMER_NORM})",
        rf"lora_unet_{_RESNET}_({_RESNET_LAYER}|norm[12])",
        rf"lora_unet_{_SAMPLER}",
        rf"lora_unet_({_TOP}|conv_norm_out)",
        rf"lora_te1?_text_model_encoder_layers_{_LAYER}_{_CLIP_PART}",
    ],
    # extensions-builtin/Lora/networks.py: names that convert to a module of the LDM model
    "AUTOMATIC1111": [
        rf"lora_unet_{_ATTENTION}_({_TRANSFORMER_LINEAR}|{_TRANSFORMER_NORM})",
        rf"lora_unet_{_RESNET}_({_RESNET_LAYER}|norm[12])",
        rf"lora_unet_{_SAMPLER}",
        rf"lora_unet_{_TOP}",
        rf"lora_te_text_model_encoder_layers_{_LAYER}_{_CLIP_PART}",
    ],
}
# what each of them reads per module (kohya LoRAModule, comfy load_lora, WebUI network_lora)
PARTS = {"lora_down.weight", "lora_up.weight", "alpha"}

# what the service trains by default (config `lora.target_modules`, the trainer's text targets)
DEFAULT_UNET = ("to_q", "to_k", "to_v", "to_out.0")
# everything kohya loads, which the other two load as well
ALL_UNET = (
    *DEFAULT_UNET, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv",
)
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
ALL_TEXT = (*TEXT_ATTENTION, "fc1", "fc2")


def _sd15_kohya_keys(unet_targets: tuple[str, ...], text_targets: tuple[str, ...]) -> Any:
    """(kohya tensors, {kohya module name: base layer}) for a full-size SD 1.5 on `meta`."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_service.models.base_model import SD15_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SD15_CONFIG / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG / "text_encoder"))
    layers = {metadata.kohya_module("lora_unet_", n): m for n, m in unet.named_modules()}
    layers |= {
        metadata.kohya_module("lora_te_text_model_", n): m for n, m in text.named_modules()
    }
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=list(unet_targets)))
    text.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=list(text_targets)))
    tensors = adapters.to_kohya(
        get_peft_model_state_dict(unet), alpha=8.0,
        text_encoder_state=get_peft_model_state_dict(text),
    )
    return tensors, layers


def test_the_service_defaults_match_the_trainer() -> None:
    from lora_service.config import Lora
    from lora_service.training.trainer import TEXT_TARGETS

    assert tuple(Lora().target_modules) == DEFAULT_UNET
    assert tuple(TEXT_TARGETS) == TEXT_ATTENTION


@pytest.mark.parametrize(
    ("unet_targets", "text_targets"),
    [(DEFAULT_UNET, TEXT_ATTENTION), (ALL_UNET, ALL_TEXT)],
    ids=["defaults", "everything-kohya-loads"],
)
def test_every_sd15_key_is_loaded_by_kohya_comfyui_and_webui(
    unet_targets: tuple[str, ...], text_targets: tuple[str, ...]
) -> None:
    tensors, layers = _sd15_kohya_keys(unet_targets, text_targets)
    modules: dict[str, set[str]] = {}
    for key in tensors:
        module, _, part = key.partition(".")
        modules.setdefault(module, set()).add(part)

    text = [m for m in modules if m.startswith("lora_te")]
    unet = [m for m in modules if m.startswith("lora_unet_")]
    assert sorted(text + unet) == sorted(modules)  # nothing but these two prefixes
    assert len(text) == 12 * len(text_targets)  # every layer of SD 1.x's text encoder
    per_attention = 8 + (len(unet_targets) > 4) * 4  # attn1/attn2 × q, k, v, out (+ proj, ff)
    assert len([m for m in unet if "_attentions_" in m]) >= 16 * per_attention

    for tool, patterns in ACCEPTED.items():
        accepted = re.compile("|".join(f"(?:{p})" for p in patterns))
        left_over = sorted(m for m in modules if not accepted.fullmatch(m))
        assert not left_over, f"{tool} drops {len(left_over)} module(s), e.g. {left_over[:3]}"

    for module, parts in sorted(modules.items()):
        assert parts == PARTS, module
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        assert float(tensors[f"{module}.alpha"]) == 8.0 and tensors[f"{module}.alpha"].dim() == 0
        # kohya's LoRAModule shapes: down (r, in[, k, k]), up (out, r[, 1, 1])
        layer = layers[module]
        assert isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)), module
        assert down.shape[0] == up.shape[1] == 4
        assert down.shape[1] == layer.weight.shape[1] and up.shape[0] == layer.weight.shape[0]
        if isinstance(layer, torch.nn.Conv2d):
            assert tuple(down.shape[2:]) == tuple(layer.kernel_size), module
            assert tuple(up.shape[2:]) == (1, 1), module


def test_text_encoder_keys_have_the_text_model_segment_either_way() -> None:
    """transformers 5's CLIPTextModel has no `text_model.` in its module paths, 4's has; the
    file names the module the same either way."""
    a = torch.zeros(2, 8)
    b = torch.zeros(8, 2)
    flat = {"encoder.layers.3.self_attn.q_proj.lora_A.weight": a,
            "encoder.layers.3.self_attn.q_proj.lora_B.weight": b}
    nested = {f"text_model.{k}": v for k, v in flat.items()}
    want = {
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj.lora_up.weight",
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj.alpha",
    }
    assert set(adapters.to_kohya({}, alpha=2.0, text_encoder_state=flat)) == want
    assert set(adapters.to_kohya({}, alpha=2.0, text_encoder_state=nested)) == want
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        adapters.to_kohya({"down_blocks.0.x.lora_magnitude_vector": a}, alpha=2.0)
