"""Zero-shot tags with open_clip: the captions for images that came without one. Imports torch.

Only `lora-service label` and the labelling child process (`python -m lora_service.labelling`)
import this module; the daemon calls that child through `lora_service.inbox.labeller.make_labeller`
and never loads torch itself.

The model is `open_clip.create_model_and_transforms(model, pretrained=<local file>)`: given a
path that is a file, open_clip loads it (`load_checkpoint`, `weights_only=True`) and downloads
nothing. `labelling.model` is a built-in open_clip architecture name (`ViT-B-32`) or the path
of an open_clip model config `.json` (registered with `open_clip.add_model_config`, named by
its stem), for an architecture open_clip does not ship.
"""

from __future__ import annotations

from pathlib import Path

import lora_service.models.torch_compat  # noqa: F401  (must precede open_clip)

# isort: split
import open_clip
import torch
from PIL import Image

from lora_service.errors import UsageError
from lora_service.store import sha256_file

PROMPT = "a picture of {}"  # CLIP matches captions, not bare words: a template helps
CHUNK = 16  # images per forward pass


def resolve_model(model: str, base: Path | None = None) -> str:
    """The open_clip architecture name for `labelling.model`, registering a `.json` config.

    A relative config path is taken relative to `base` (the config file's folder)."""
    if not model.endswith(".json"):
        return model
    path = Path(model)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise UsageError(f"labelling.model: {path}: no such open_clip model config file")
    open_clip.add_model_config(path)
    return path.stem


class ClipLabeller:
    """Callable `[image paths] -> {file name: "tag1, tag2, tag3"}`, the intake's `Labeller`.

    The vocabulary's text embeddings are computed once; each image gets the `top_k` tags of
    highest cosine similarity, best first. `model` and `weights_sha256` say exactly which
    model captioned (journaled with `CaptionsGenerated`)."""

    def __init__(
        self,
        model: str,
        weights: Path,
        vocabulary: tuple[str, ...],
        top_k: int,
        *,
        config_dir: Path | None = None,
    ) -> None:
        weights = Path(weights)
        if not weights.is_file():
            raise UsageError(f"labelling.weights: {weights}: no such file")
        if not vocabulary:
            raise UsageError("labelling.vocabulary: empty; list the tags to choose from")
        name = resolve_model(model, config_dir)
        if name not in open_clip.list_models():
            raise UsageError(f"labelling.model: {model!r} is not an open_clip architecture "
                             "(e.g. ViT-B-32) nor a model config .json file")
        self.model = name
        self.weights_sha256 = sha256_file(weights)
        self.vocabulary = tuple(vocabulary)
        self.top_k = min(top_k, len(self.vocabulary))
        try:
            # a path that is a file is loaded as is; open_clip only downloads for known tags
            self._clip, _, self._preprocess = open_clip.create_model_and_transforms(
                name, pretrained=str(weights.resolve())
            )
        except RuntimeError as exc:
            raise UsageError(f"labelling.weights: {weights} does not fit {name}: "
                             f"{str(exc).splitlines()[0][:300]}") from None
        self._clip.eval()
        tokenizer = open_clip.get_tokenizer(name)
        with torch.no_grad():
            text = self._clip.encode_text(tokenizer([PROMPT.format(t) for t in self.vocabulary]))
            self._text = text / text.norm(dim=-1, keepdim=True)

    def tags(self, images: list[Image.Image]) -> list[list[str]]:
        """The top_k tags of each image, best first."""
        out: list[list[str]] = []
        for start in range(0, len(images), CHUNK):
            batch = torch.stack([self._preprocess(im) for im in images[start : start + CHUNK]])
            with torch.no_grad():
                features = self._clip.encode_image(batch)
                features = features / features.norm(dim=-1, keepdim=True)
                best = (features @ self._text.T).topk(self.top_k, dim=-1).indices
            out += [[self.vocabulary[i] for i in row.tolist()] for row in best]
        return out

    def __call__(self, paths: list[Path]) -> dict[str, str]:
        """{file name: caption} for every image that opens; unreadable ones are left out."""
        names, images = [], []
        for path in paths:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except (OSError, ValueError):
                continue
            names.append(Path(path).name)
        return {name: ", ".join(tags) for name, tags in zip(names, self.tags(images), strict=True)}
