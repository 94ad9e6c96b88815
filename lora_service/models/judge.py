"""The judge: does a generated image show what its prompt asks for?

A small CNN trained on `lora_service.world`'s ground truth (every shape, the new ones and the
hollow style included) that names an image's shape, colour and style. It scores a sample against
its prompt by the world's words in the prompt: the concept (shape and style) and the colour.
Shipped next to `builtin:shapes-sd` (`weights/shapes-sd/judge.safetensors`, ~200 KB).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from lora_service import world

HEADS = {"shape": world.SHAPES, "colour": tuple(world.COLOURS), "hollow": (False, True)}
SIZE = 64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (24, 48, 64, 96):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out),
                       nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(channels, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """Images as the judge sees them: SIZE x SIZE RGB in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
              for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@dataclass(frozen=True)
class Asked:
    """What a prompt asks for in the world's words (None: it does not say)."""
    shape: str | None
    colour: str | None
    hollow: bool

    @property
    def concept(self) -> str | None:
        return None if self.shape is None else ("hollow " if self.hollow else "") + self.shape


def asked(prompt: str) -> Asked:
    words = re.findall(r"[a-z]+", prompt.lower())
    shape = next((w for w in words if w in world.SHAPES), None)
    colour = next((w for w in words if w in world.COLOURS), None)
    return Asked(shape, colour, "hollow" in words)


class Judge:
    def __init__(self, net: Net) -> None:
        self.net = net.eval()

    @classmethod
    def load(cls, path: Path) -> Judge:
        net = Net()
        net.load_state_dict({k: v.float() for k, v in load_file(path).items()})
        return cls(net)

    @torch.no_grad()
    def name(self, images: Sequence[Image.Image]) -> list[dict[str, object]]:
        """What each image shows: {"shape": ..., "colour": ..., "hollow": ...}."""
        out = self.net(pixels(images))
        picks = {k: out[k].argmax(1).tolist() for k in HEADS}
        return [{k: HEADS[k][picks[k][i]] for k in HEADS} for i in range(len(images))]

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[dict[str, bool]]:
        """Per image: {"concept": shows the prompt's shape in its style, "colour": its colour}
        (a key only where the prompt names it)."""
        out = []
        for seen, prompt in zip(self.name(images), prompts, strict=True):
            want = asked(prompt)
            marks: dict[str, bool] = {}
            if want.shape is not None:
                marks["concept"] = seen["shape"] == want.shape and seen["hollow"] == want.hollow
            if want.colour is not None:
                marks["colour"] = seen["colour"] == want.colour
            out.append(marks)
        return out
