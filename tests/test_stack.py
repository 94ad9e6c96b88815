"""The heavy stack imports together (torchvision trap fixed) and no CUDA torch slipped in."""

from __future__ import annotations

import subprocess
import sys


def test_diffusers_peft_and_open_clip_import_in_one_process() -> None:
    code = (
        "import lora_service.models.torch_compat\n"
        "import torch, diffusers, peft, open_clip, transformers\n"
        "from diffusers import UNet2DConditionModel\n"
        "from peft import LoraConfig\n"
        "assert torch.__version__.startswith('2.13.0'), torch.__version__\n"
        "assert torch.version.cuda is None, torch.version.cuda\n"  # the CPU build, not CUDA
        "print(torch.__version__, diffusers.__version__, peft.__version__, open_clip.__version__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("2.13.0")


def test_no_nvidia_packages_installed() -> None:
    from importlib.metadata import distributions

    names = sorted(d.metadata["Name"] for d in distributions())
    assert not [n for n in names if n.lower().startswith("nvidia")]
