"""A single-file SD 1.x `.safetensors` checkpoint as base model: loaded offline against the
shipped configs, trained, exported in a kohya file that applies to it.

The checkpoint is a full-size SD 1.5 at random weights (fp16, 2.1 GB, as pruned checkpoints are
shared), written in the original key layout by `ldm_checkpoint.to_ldm`: the real loading path
with no hub and no download. About a minute on 2 cores, most of it building and writing it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_service.journal import Journal
from lora_service.models.base_model import SD15_CONFIG, load_pipeline_components, materialise

from .conftest import ROOT, TINY_TRAIN, add_batch
from .ldm_checkpoint import to_ldm

RANK, ALPHA = 4, 8  # alpha != rank: the kohya file must carry the configured alpha


def _same(want: object, got: object, dtype: object) -> None:
    w, g = want.state_dict(), got.state_dict()  # type: ignore[attr-defined]
    assert w.keys() == g.keys()
    different = [k for k in w if not (w[k].to(dtype).float() == g[k].float()).all()]
    assert not different, different[:5]


def test_the_ldm_helper_is_the_inverse_of_diffusers_converters(base_cache: Path,
                                                               tmp_path: Path) -> None:
    """What `to_ldm` writes, diffusers' own single-file converters read back exactly."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    unet, vae, text_encoder, _, _ = load_pipeline_components(
        materialise("builtin:tiny-sd", base_cache.parent))
    path = tmp_path / "tiny.safetensors"
    save_file(to_ldm(unet, vae, text_encoder, torch.float32), path)
    kw = {"config": str(base_cache / "tiny-sd"), "local_files_only": True}
    _same(unet, UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kw),
          torch.float32)
    _same(vae, AutoencoderKL.from_single_file(str(path), subfolder="vae", **kw), torch.float32)
    text = CLIPTextModel(text_encoder.config)
    text.load_state_dict(convert_ldm_clip_checkpoint(load_file(path)), strict=False)
    _same(text_encoder, text, torch.float32)


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A random SD 1.5 in one fp16 file; checked to load back exactly, in fp32."""
    import lora_service.models.torch_compat  # noqa: F401  (must precede transformers)

    # isort: split
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("sd15")
    path = folder / "sd15-random.safetensors"
    cfg = str(SD15_CONFIG)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder"))
    save_file(to_ldm(unet, vae, text_encoder, torch.float16), path)

    base = materialise(str(path), folder / "state")
    assert base.kind == "single_file" and base.path == path
    assert base.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_pipeline_components(base)
    for want, got in zip((unet, vae, text_encoder), loaded[:3], strict=True):
        assert next(got.parameters()).dtype == torch.float32  # fp16 file, fp32 training
        _same(want, got, torch.float16)
    del unet, vae, text_encoder, loaded
    yield path
    path.unlink()


def test_a_single_file_sd15_checkpoint_trains_a_version_whose_kohya_file_applies(
    sd15_file: Path, tmp_path: Path
) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    config = tmp_path / "conf" / "config.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({
        "base_model": str(sd15_file),
        "paths": {"inbox": "../inbox", "state": "../state"},
        "lora": {"rank": RANK, "alpha": ALPHA},
        "train": {**TINY_TRAIN, "resolution": 64, "epochs": 1, "threads": 2},
        "samples": {"enabled": False},
        "logging": {"tensorboard": False},
    }))
    state = tmp_path / "state"
    add_batch(state, "a", n=2, size=64)
    done = subprocess.run([sys.executable, "-m", "lora_service", "train-now", "--config",
                           str(config)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with Journal.for_state(state) as journal:
        base = [e.payload for e in journal.events(types=("BaseModelRegistered",))]
        assert [(b["kind"], b["path"]) for b in base] == [("single_file", str(sd15_file))]
        version = journal.query("SELECT * FROM versions")[0]
    assert version["base_sha256"] == base[0]["sha256"]
    folder = state / "versions" / version["version"]
    kohya = folder / f"lora-service-{version['version']}.safetensors"

    unet, vae, text_encoder, tokenizer, scheduler = load_pipeline_components(
        materialise(str(sd15_file), state))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(kohya), adapter_name="v")
    adapter = load_file(folder / "adapter" / "adapter_model.safetensors")
    got = get_peft_model_state_dict(pipe.unet, adapter_name="v")
    adapter = {k.removeprefix("base_model.model."): v for k, v in adapter.items()}
    assert set(adapter) == set(got)
    for key, value in adapter.items():
        assert torch.equal(got[key], value), key
    scalings = {m.scaling["v"] for m in pipe.unet.modules() if hasattr(m, "scaling")}
    assert scalings == {ALPHA / RANK}
    with safe_open(str(kohya), framework="pt") as f:  # what WebUI matches a checkpoint by
        assert f.metadata()["ss_new_sd_model_hash"] == base[0]["sha256"]
