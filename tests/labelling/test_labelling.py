"""Labelling with a real (tiny, random-weight) open_clip model saved to a local file: `label DIR`
writes sidecars and keeps existing ones, the daemon's torch-free child labeller feeds the
intake, and without weights `label` says how to enable labelling (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lora_service.config import load_config
from lora_service.journal import Journal
from lora_service.store import sha256_file
from tests.inbox.conftest import drop, image_bytes

ROOT = Path(__file__).resolve().parents[2]
VOCABULARY = ["cat", "dog", "tree", "house", "car", "person"]
TINY_CLIP = {  # a ViT-style CLIP small enough to build and run in well under a second
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model config .json, weights .safetensors) of a random-weight tiny CLIP."""
    import lora_service.models.torch_compat  # noqa: F401

    # isort: split
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    config = folder / "tiny-clip-test.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    weights = folder / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights


def lora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lora_service", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def clip_config(write_config: Callable[..., Path], tiny_clip: tuple[Path, Path]) -> Path:
    model, weights = tiny_clip
    return write_config({"labelling": {"enabled": True, "model": str(model),
                                       "weights": str(weights), "vocabulary": VOCABULARY,
                                       "top_k": 2}})


def _tags(caption: str) -> list[str]:
    return caption.split(", ")


def test_label_writes_missing_captions_and_keeps_existing(clip_config: Path,
                                                          tmp_path: Path) -> None:
    folder = drop(tmp_path / "pics", {"a.png": image_bytes(1), "b.png": image_bytes(2),
                                      "c.jpg": image_bytes(3, fmt="JPEG"),
                                      "c.txt": "my own caption\n", "notes.md": "not an image"},
                  ready=False)
    result = lora("label", str(folder), "--config", str(clip_config))
    assert result.returncode == 0, result.stderr
    assert "2 caption(s) written" in result.stdout
    for name in ("a", "b"):
        tags = _tags((folder / f"{name}.txt").read_text().strip())
        assert len(tags) == 2 and len(set(tags)) == 2 and set(tags) <= set(VOCABULARY)
    assert (folder / "c.txt").read_text() == "my own caption\n"
    assert not (folder / "notes.txt").exists()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []

    # the same model, loaded in-process through the same class, gives the same captions
    from lora_service.models.clip import ClipLabeller

    config = load_config(clip_config)
    labeller = ClipLabeller(config.labelling.model, config.labelling.weights,
                            config.labelling.vocabulary, 2)
    direct = labeller([folder / "a.png", folder / "b.png"])
    assert direct == {n: (folder / n.replace(".png", ".txt")).read_text().strip()
                      for n in ("a.png", "b.png")}
    assert labeller.model == "tiny-clip-test"

    again = lora("label", str(folder), "--config", str(clip_config))
    assert again.returncode == 0 and "0 caption(s) written" in again.stdout


def test_label_without_weights_says_how_to_enable(write_config: Callable[..., Path],
                                                  tmp_path: Path) -> None:
    folder = drop(tmp_path / "pics", {"a.png": image_bytes(1)}, ready=False)
    result = lora("label", str(folder), "--config", str(write_config()))
    assert result.returncode == 2
    assert "labelling.enabled: true" in result.stderr and "labelling.weights:" in result.stderr
    assert "Traceback" not in result.stderr and not (folder / "a.txt").exists()

    missing = write_config({"labelling": {"weights": str(tmp_path / "nowhere.pt")}})
    result = lora("label", str(folder), "--config", str(missing))
    assert result.returncode == 2 and "nowhere.pt: no such file" in result.stderr


def test_daemon_labeller_runs_in_a_child_and_feeds_the_intake(clip_config: Path,
                                                              tiny_clip: tuple[Path, Path]
                                                              ) -> None:
    # the daemon may import lora_service.labelling: it must not load torch
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, lora_service.inbox.labeller, lora_service.inbox;"
         " sys.exit('torch' in sys.modules)"], cwd=ROOT)
    assert probe.returncode == 0

    from lora_service.inbox.intake import Intake
    from lora_service.inbox.labeller import make_labeller

    config = load_config(clip_config)
    labeller = make_labeller(config)
    assert labeller is not None
    drop(config.paths.inbox / "pets", {"x.png": image_bytes(5), "y.png": image_bytes(6),
                                       "y.txt": "a captioned one"})
    with Journal.for_state(config.paths.state) as journal:
        Intake(journal, config, labeller=labeller).scan(now=1e12)
        accepted = [e.event for e in journal.events(types=("BatchAccepted",))]
        generated = [e.event for e in journal.events(types=("CaptionsGenerated",))]
    assert len(accepted) == 1
    sources = {i.file: (i.caption_source, i.caption) for i in accepted[0].images}
    assert sources["y.png"] == ("sidecar", "a captioned one")
    assert sources["x.png"][0] == "clip" and set(_tags(sources["x.png"][1])) <= set(VOCABULARY)
    assert generated[0].model == "tiny-clip-test"
    assert generated[0].weights_sha256 == sha256_file(tiny_clip[1])
    assert generated[0].captions == {"x.png": sources["x.png"][1]}

    disabled = load_config(clip_config).model_copy(
        update={"labelling": config.labelling.model_copy(update={"enabled": False})})
    assert make_labeller(disabled) is None


def test_labelling_config_rejects_enabled_without_weights(write_config: Callable[..., Path]
                                                          ) -> None:
    from lora_service.errors import UsageError

    path = write_config()
    data = yaml.safe_load(path.read_text())
    data["labelling"] = {"enabled": True}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UsageError, match="labelling.weights"):
        load_config(path)
