"""A user's own diffusers script, run by the project's interpreter without importing
lora_service, loads a published version's kohya file (UNet and text encoder LoRA) and gets
what the trained peft model gives.

Before the start-up hook (`_lora_service_torchvision`, loaded by the installed
`lora_service_torchvision.pth`), `from diffusers import StableDiffusionPipeline` failed in such a
script: the only torchvision for torch 2.13.0 is a CUDA build. The supervisor must stay free of
torch all the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lora_service.config import Config, load_config
from lora_service.journal import Journal

RANK, ALPHA = 4, 8.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

# what the user writes: diffusers only, no lora_service import
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    base, lora, inputs, out = sys.argv[1:5]
    x = load_file(inputs)
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)

    @torch.no_grad()
    def outputs(prefix):
        unet = pipe.unet(x["latents"], x["timesteps"], x["hidden"]).sample
        text = pipe.text_encoder(x["ids"])[0]
        return {prefix + "unet": unet.contiguous(), prefix + "text": text.contiguous()}

    got = outputs("base_")
    pipe.load_lora_weights(lora)
    got |= outputs("lora_")
    save_file(got, out)
    ours = sorted(m for m in sys.modules if m.startswith("lora_service"))
    hook = [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "TorchvisionFinder"]
    print(json.dumps({"lora_service": ours, "hook": hook}))
    """
)


def _plain_env() -> dict[str, str]:
    """The environment a user's shell would give: no PYTHONPATH pointing into the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture
def demo_config(write_config: Callable[..., Path]) -> Config:
    return load_config(write_config({
        "name": "demo",
        "lora": {"rank": RANK, "alpha": ALPHA, "train_text_encoder": True},
    }))


def test_a_plain_diffusers_script_loads_a_version_like_the_peft_model(
    tmp_path: Path,
    demo_config: Config,
    tiny_pipe: Callable[[], Any],
    add_lora_fn: Callable[..., Any],
    start_run: Callable[..., None],
    publish_kwargs: Callable[..., dict[str, Any]],
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from tests.versions.conftest import publish_version

    trained = tiny_pipe()
    add_lora_fn(trained.unet, rank=RANK, alpha=ALPHA, targets=UNET_TARGETS, seed=1)
    add_lora_fn(trained.text_encoder, rank=RANK, alpha=ALPHA, targets=TEXT_TARGETS, seed=2)
    g = torch.Generator().manual_seed(3)
    inputs = {
        "latents": torch.randn(2, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([10, 500]),
        "hidden": torch.randn(2, 7, 32, generator=g),
        "ids": torch.randint(0, 49406, (2, 9), generator=g),
    }
    with torch.no_grad():
        want_unet = trained.unet(inputs["latents"], inputs["timesteps"], inputs["hidden"]).sample
        want_text = trained.text_encoder(inputs["ids"])[0]

    journal = Journal.for_state(demo_config.paths.state)
    start_run(journal, demo_config, "r1", None)
    version = publish_version(journal, demo_config, run_id="r1", unet=trained.unet,
                              text_encoder=trained.text_encoder, **publish_kwargs())
    kohya = demo_config.paths.state / "versions" / version / f"demo-{version}.safetensors"
    base = tmp_path / "base"
    tiny_pipe().save_pretrained(str(base))
    save_file(inputs, str(tmp_path / "inputs.safetensors"))

    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(base), str(kohya), str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "out.safetensors")],
        cwd=tmp_path, env=_plain_env(), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"lora_service": [], "hook": ["TorchvisionFinder"]}

    got = load_file(str(tmp_path / "out.safetensors"))
    assert (got["lora_unet"] - got["base_unet"]).abs().max().item() > 1e-3  # it changed
    assert (got["lora_text"] - got["base_text"]).abs().max().item() > 1e-3
    assert (got["lora_unet"] - want_unet).abs().max().item() < 1e-5
    assert (got["lora_text"] - want_text).abs().max().item() < 1e-5


def test_every_interpreter_of_the_environment_gets_the_hook_and_the_supervisor_no_torch(
    tmp_path: Path,
) -> None:
    check = (
        "import sys; assert 'torch' not in sys.modules, 'torch at start-up'; "
        "print(*[type(f).__name__ for f in sys.meta_path])"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=_plain_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "TorchvisionFinder" in done.stdout.split(), (
        f"the installed lora_service_torchvision.pth did not run (reinstall: pip install -e .): "
        f"{done.stdout} {done.stderr[-2000:]}"
    )
    supervisor = (
        "import lora_service.daemon.supervisor, sys; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    )
    done = subprocess.run([sys.executable, "-c", supervisor], cwd=tmp_path, env=_plain_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
