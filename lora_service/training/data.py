"""The run's images as training tensors: VAE latents and text embeddings, encoded once.

Only the LoRA layers train, so an image's latent (VAE posterior mean x scaling factor) and its
caption's text embedding never change within a base model: they are encoded once per image and
kept in memory, and with `cache_latents` also on disk under
`state/cache/<base sha256[:16]>/` (latents keyed by image sha256 + resolution, text by caption
sha256), written atomically as safetensors, so the next run and a resumed run skip the VAE and
text encoder entirely. The training loop then touches nothing but the UNet.

With `lora.train_text_encoder` the embeddings change every step, so only token ids are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lora_service.errors import ServiceError
from lora_service.store import atomic_write_bytes, sha256_bytes
from lora_service.training import heartbeat


@dataclass(frozen=True)
class Item:
    batch_id: str
    file: str
    sha256: str
    caption: str

    @property
    def name(self) -> str:
        return f"{self.batch_id}/{self.file}"


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """RGB, shorter side resized to `resolution` (bicubic), centre-cropped, scaled to [-1, 1]."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.BICUBIC)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    pixels = data.view(resolution, resolution, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


class EncodedData:
    """Latents and text conditioning for a list of items, computed once (see module doc)."""

    def __init__(
        self,
        items: list[Item],
        *,
        state_dir: Path,
        base_sha256: str,
        resolution: int,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        cache_on_disk: bool,
        encode_text: bool = True,
    ) -> None:
        self.items = items
        self.cache = state_dir / "cache" / base_sha256[:16] if cache_on_disk else None
        self.state_dir = state_dir
        self.resolution = resolution
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.encode_text = encode_text
        self.latents: list[torch.Tensor] = []
        self.text: list[torch.Tensor] = []  # embeddings, or token ids when not encode_text
        self.encoded_images = 0  # how many went through the VAE (not from the disk cache)
        with torch.no_grad():
            for item in items:
                self.latents.append(self._latent(item))
                self.text.append(self._text(item.caption))
                heartbeat.beat()

    def __len__(self) -> int:
        return len(self.items)

    def _cached(self, key: str, compute: Any) -> torch.Tensor:
        if self.cache is None:
            return compute()
        path = self.cache / f"{key}.safetensors"
        if path.exists():
            try:
                return st_load(path.read_bytes())["t"]
            except Exception:  # noqa: BLE001  (a damaged cache file is simply recomputed)
                pass
        value = compute()
        atomic_write_bytes(path, st_save({"t": value.contiguous()}))
        return value

    def _latent(self, item: Item) -> torch.Tensor:
        def compute() -> torch.Tensor:
            path = self.state_dir / "batches" / item.batch_id / item.file
            if not path.exists():
                raise ServiceError(f"{path}: image of batch {item.batch_id} is missing")
            pixels = load_pixels(path, self.resolution).unsqueeze(0)
            self.encoded_images += 1
            dist = self.vae.encode(pixels).latent_dist
            return (dist.mean * self.vae.config.scaling_factor)[0]

        return self._cached(f"latent-{item.sha256}-{self.resolution}", compute)

    def _text(self, caption: str) -> torch.Tensor:
        ids = self.tokenizer(
            caption,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        if not self.encode_text:
            return ids[0]
        key = f"text-{sha256_bytes(caption.encode())}"
        return self._cached(key, lambda: self.text_encoder(ids)[0][0])

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.stack([self.latents[i] for i in indices]),
            torch.stack([self.text[i] for i in indices]),
        )
