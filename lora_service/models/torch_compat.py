"""Make the only torchvision that matches torch 2.13.0 importable on CPU torch.

The fix itself (two op schemas defined before torchvision's fake kernels need them) lives in the
top-level module `_lora_service_torchvision`, which the installed `lora_service_torchvision.pth`
loads into every interpreter of the environment, so it runs when anything first looks for
torchvision. Importing this module applies it at once, for code that must not depend on the
`.pth` having run (`python -S`, or a checkout used without installing it): import it before
anything that imports transformers, diffusers, peft or open_clip.
"""

from __future__ import annotations

from _lora_service_torchvision import install

install()
