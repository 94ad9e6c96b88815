"""The two on-disk formats: the kohya file loads back in diffusers with the same output as the
trained peft model (alpha != rank, so the converter's alpha = rank trap would show) and carries
the metadata kohya writes, the peft layout round-trips bit-exactly, and no published or
exported file holds a local path."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import lora_service.models.torch_compat  # noqa: F401

# isort: split
import safetensors
import torch
from diffusers.utils import convert_state_dict_to_kohya

from lora_service.models import adapters
from lora_service.versions import metadata

RANK, ALPHA = 4, 8.0
SS_KEYS = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_base_model_version",
    "ss_learning_rate",
    "ss_lr_scheduler",
    "ss_optimizer",
    "ss_steps",
    "ss_epoch",
    "ss_num_train_images",
    "ss_resolution",
    "ss_seed",
    "ss_mixed_precision",
    "ss_tag_frequency",
    "ss_training_started_at",
    "ss_training_finished_at",
    "ss_output_name",
    "ss_session_id",
    "ss_clip_skip",
    "ss_noise_offset",
    "ss_bucket_info",
    "ss_enable_bucket",
    "ss_total_batch_size",
    "ss_num_batches_per_epoch",
    "ss_num_validation_images",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.date",
    "modelspec.prediction_type",
    "lora_service_parent",
    "lora_service_parent_sha256",
    "lora_service_manifest",
    "lora_service_journal_seq",
    "lora_service_journal_hash",
)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 7, 32, generator=g)
    ids = torch.randint(0, 49406, (2, 9), generator=g)
    return latents, hidden, ids


@torch.no_grad()
def _outputs(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    latents, hidden, ids = _inputs()
    unet_out = pipe.unet(latents, torch.tensor([10, 500]), hidden).sample
    te_out = pipe.text_encoder(ids)[0]
    return unet_out, te_out


def _metadata(manifest: dict[str, str]) -> dict[str, str]:
    effective = {
        "lora": {"rank": RANK, "alpha": ALPHA, "target_modules": ["to_q"]},
        "train": {
            "resolution": 32,
            "lr_scheduler": "constant",
            "mixed_precision": "no",
            "batch_size": 2,
        },
    }
    return metadata.ss_metadata(
        output_name="demo",
        version="v0001",
        parent=None,
        parent_sha256=None,
        run_id="r1",
        effective_config=effective,
        base_sha256="e" * 64,
        base_model="builtin:tiny-sd",
        learning_rate=1e-4,
        step=12,
        steps=12,
        epochs=3,
        images=2,
        seed=0,
        captions={"cats": ["cat, red", "cat"]},
        manifest=manifest,
        started_at="2025-01-01T00:00:00Z",
        finished_at="2025-01-01T00:01:00Z",
        journal_seq=5,
        journal_hash="9" * 64,
        text_encoder=True,
        validation_images=1,
    )


def test_kohya_file_loads_back_in_diffusers_with_the_same_output(
    tmp_path: Path, tiny_pipe: Callable[[], Any], add_lora_fn: Callable[..., Any]
) -> None:
    trained = tiny_pipe()
    add_lora_fn(
        trained.unet, rank=RANK, alpha=ALPHA, targets=["to_q", "to_k", "to_v", "to_out.0"], seed=1
    )
    add_lora_fn(
        trained.text_encoder,
        rank=RANK,
        alpha=ALPHA,
        targets=["q_proj", "k_proj", "v_proj", "out_proj"],
        seed=2,
    )
    want_unet, want_te = _outputs(trained)
    base_unet, _ = _outputs(tiny_pipe())
    assert (want_unet - base_unet).abs().max() > 1e-3  # the adapter changes the output

    unet_state = adapters.peft_unet_state_dict(trained.unet)
    te_state = adapters.peft_state_dict(trained.text_encoder)
    tensors = adapters.to_kohya(unet_state, alpha=ALPHA, text_encoder_state=te_state)
    manifest = {"batches/b/a.png": "a" * 64, "batches/b/a.txt": "b" * 64}
    path = tmp_path / "demo-v0001.safetensors"
    sha = adapters.write_kohya(path, tensors, _metadata(manifest))
    assert sha == __import__("hashlib").sha256(path.read_bytes()).hexdigest()

    keys = sorted(tensors)
    assert any(k.startswith("lora_unet_") and k.endswith("_to_q.lora_down.weight") for k in keys)
    # SD 1.x tools' text-encoder names: kohya's `lora_te_` and CLIP's `text_model_` segment
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
    assert alphas and all(float(a) == ALPHA for a in alphas)
    assert len(alphas) == len([k for k in keys if k.endswith(".lora_down.weight")])

    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    for key in SS_KEYS:
        assert key in meta, key
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["lora_service_manifest"]) == manifest
    assert json.loads(meta["ss_tag_frequency"]) == {"cats": {"cat": 2, "red": 1}}
    assert meta["lora_service_journal_seq"] == "5"
    assert len(meta["sshs_model_hash"]) == 64
    # a builtin base is no checkpoint file WebUI or model sites could match by hash
    assert "ss_sd_model_hash" not in meta and "ss_new_sd_model_hash" not in meta

    loaded = tiny_pipe()
    loaded.load_lora_weights(str(path))
    got_unet, got_te = _outputs(loaded)
    assert (got_unet - want_unet).abs().max().item() < 1e-5
    assert (got_te - want_te).abs().max().item() < 1e-5

    # the trap this guards against: diffusers' converter alone writes alpha = rank
    raw = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in unet_state.items()})
    assert {float(v) for k, v in raw.items() if k.endswith(".alpha")} == {float(RANK)}
    wrong = tiny_pipe()
    wrong.load_lora_weights({k: v.clone() for k, v in raw.items()})
    wrong_unet, _ = _outputs(wrong)
    assert (wrong_unet - want_unet).abs().max().item() > 1e-3


def test_peft_layout_round_trips_bit_exactly(
    tmp_path: Path, lora_unet: Callable[..., Any], tiny_pipe: Callable[[], Any]
) -> None:
    unet = lora_unet(rank=RANK, alpha=ALPHA)
    files = adapters.write_peft(tmp_path / "adapter", unet)
    assert set(files) == {"adapter_model.safetensors", "adapter_config.json"}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert sorted(config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    stored = safetensors.torch.load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in stored)

    fresh = tiny_pipe().unet  # no adapter yet: injected from adapter_config.json
    adapters.load_peft_into(fresh, tmp_path / "adapter")
    want = adapters.peft_unet_state_dict(unet)
    got = adapters.peft_unet_state_dict(fresh)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key

    # a UNet whose adapter the trainer already built: same geometry loads, other rank refuses
    built = lora_unet(rank=RANK, alpha=ALPHA, seed=9)
    adapters.load_peft_into(built, tmp_path / "adapter")
    assert all(torch.equal(adapters.peft_unet_state_dict(built)[k], want[k]) for k in want)
    other = lora_unet(rank=2, alpha=ALPHA)
    with pytest.raises(ValueError, match="r 2"):
        adapters.load_peft_into(other, tmp_path / "adapter")


def test_peft_layout_is_readable_by_peft_itself(
    tmp_path: Path, lora_unet: Callable[..., Any], tiny_pipe: Callable[[], Any]
) -> None:
    from peft import PeftModel

    unet = lora_unet(rank=RANK, alpha=ALPHA)
    adapters.write_peft(tmp_path / "adapter", unet)
    model = PeftModel.from_pretrained(tiny_pipe().unet, str(tmp_path / "adapter"))
    got = adapters.peft_state_dict(model)
    want = adapters.peft_unet_state_dict(unet)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_kohya_metadata_values_are_written_as_kohya_writes_them() -> None:
    meta = _metadata({})
    # Stability AI ModelSpec, as kohya's library/sai_model_spec.py fills it for an SD 1.x LoRA
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "demo-v0001"
    assert meta["modelspec.resolution"] == "32x32"
    assert meta["modelspec.date"] == "2025-01-01T00:01:00+00:00"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.implementation_version"].startswith("lora-service/")
    # train_network's ss_* keys: str() of kohya's values
    assert meta["ss_output_name"] == "demo"  # the fixed deploy name: WebUI's alias
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"
    assert meta["ss_optimizer"] == metadata.optimizer_name(torch.optim.AdamW)
    assert 0 <= int(meta["ss_session_id"]) < 2**32
    assert meta["ss_session_id"] == metadata.session_id("r1") != metadata.session_id("r2")
    assert meta["ss_training_started_at"] == "1735689600.0"  # Unix seconds
    assert meta["ss_resolution"] == "(32, 32)"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_clip_skip"] == "None" and meta["ss_noise_offset"] == "None"
    assert meta["ss_enable_bucket"] == "False" and meta["ss_bucket_info"] == "null"
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_total_batch_size"] == "2"
    assert meta["ss_num_train_images"] == "2" and meta["ss_num_batches_per_epoch"] == "1"
    assert meta["ss_num_validation_images"] == "1" and meta["ss_num_reg_images"] == "0"
    assert json.loads(meta["ss_dataset_dirs"]) == {"cats": {"img_count": 2, "n_repeats": 1}}
    assert meta["ss_text_encoder_lr"] == meta["ss_learning_rate"] == "0.0001"
    assert all(isinstance(v, str) for v in meta.values())


def _sd_model_hashes_as_kohya(path: Path) -> dict[str, str]:
    """What sd-scripts' train_util.model_hash / calculate_sha256 (and WebUI's
    sd_models.model_hash / hashes.sha256) give for a checkpoint file, written out here."""
    import hashlib

    data = path.read_bytes()
    return {
        "ss_sd_model_hash": hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
        "ss_new_sd_model_hash": hashlib.sha256(data).hexdigest(),
    }


def test_published_and_exported_files_hold_no_local_path_and_the_base_hashes(
    tmp_path: Path,
    write_config: Callable[..., Path],
    tiny_pipe: Callable[[], Any],
    add_lora_fn: Callable[..., Any],
    start_run: Callable[..., None],
    publish_kwargs: Callable[..., dict[str, Any]],
) -> None:
    from transformers import CLIPTextModel

    from lora_service.config import load_config
    from lora_service.journal import Journal
    from lora_service.journal.events import BaseModelRegistered
    from lora_service.store import sha256_file
    from lora_service.versions.export import export_version
    from tests.versions.conftest import publish_version

    # a single-file base (bytes enough for the old hash's 64 KiB at 1 MiB) and a weights file
    models = tmp_path / "models"
    models.mkdir()
    checkpoint = models / "my-sd15.safetensors"
    checkpoint.write_bytes(torch.randint(0, 256, (0x120000,), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(1)).numpy()
                           .tobytes())
    (models / "clip.bin").write_bytes(b"x")
    config = load_config(write_config({
        "name": "demo",
        "base_model": str(checkpoint),
        "paths": {"deploy_dir": "../deploy"},
        "lora": {"rank": RANK, "alpha": ALPHA, "train_text_encoder": True},
        "labelling": {"weights": "../models/clip.bin"},
        "logging": {"file": "../logs/train.log"},
    }))
    journal = Journal.for_state(config.paths.state)
    base_sha = sha256_file(checkpoint)
    journal.append(BaseModelRegistered(spec=str(checkpoint), sha256=base_sha,
                                       path=str(checkpoint), kind="single_file"))
    start_run(journal, config, "r1", None, base_sha256=base_sha)

    pipe = tiny_pipe()  # the text encoder loaded from a folder: transformers records the path
    pipe.save_pretrained(str(tmp_path / "tiny"))
    text_encoder = CLIPTextModel.from_pretrained(str(tmp_path / "tiny"), subfolder="text_encoder")
    add_lora_fn(pipe.unet, rank=RANK, alpha=ALPHA, targets=["to_q", "to_v"], seed=1)
    add_lora_fn(text_encoder, rank=RANK, alpha=ALPHA, targets=["q_proj"], seed=2)
    assert str(tmp_path) in str(text_encoder.peft_config["default"].base_model_name_or_path)
    version = publish_version(journal, config, run_id="r1", unet=pipe.unet,
                              text_encoder=text_encoder, **publish_kwargs(), validation_images=0)
    out = tmp_path / "out"
    out.mkdir()
    export_version(journal, config, version, "kohya", out)
    export_version(journal, config, version, "peft", out / "peft")

    folder = config.paths.state / "versions" / version
    shared = [p for root in (folder, config.paths.deploy_dir, out) for p in root.rglob("*")
              if p.is_file()]
    assert len(shared) == 12  # peft (4: UNet, text encoder), kohya, card; deployed; exported
    for path in shared:
        data = path.read_bytes()
        for local in {str(tmp_path), str(Path.home()), os.getcwd()} - {"/"}:
            assert local.encode() not in data, f"{path.relative_to(tmp_path)} holds {local}"

    for kohya in (folder / "demo-v0001.safetensors", config.paths.deploy_dir / "demo.safetensors"):
        _, meta = adapters.read_kohya(kohya)
        assert meta["ss_output_name"] == "demo" and meta["modelspec.title"] == "demo-v0001"
        assert {k: meta[k] for k in ("ss_sd_model_hash", "ss_new_sd_model_hash")} == (
            _sd_model_hashes_as_kohya(checkpoint))
        assert meta["ss_sd_model_name"] == "my-sd15.safetensors"
        shared_config = json.loads(meta["lora_service_config"])
        assert shared_config["base_model"] == "my-sd15.safetensors"
        assert shared_config["labelling"]["weights"] == "clip.bin"
        assert "paths" not in shared_config and "logging" not in shared_config
    card = json.loads((folder / "card.json").read_text())
    assert card["config"] == shared_config
    te_config = folder / "adapter" / "text_encoder" / "adapter_config.json"
    assert json.loads(te_config.read_text())["base_model_name_or_path"] is None
    # the journal keeps the configuration as run
    run = journal.query("SELECT config FROM runs WHERE run_id = 'r1'")[0]
    assert json.loads(run["config"])["base_model"] == str(checkpoint)


def test_base_hashes_by_kind(tmp_path: Path) -> None:
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"tiny")  # shorter than 1 MiB: kohya hashes the empty read
    assert metadata.sd_model_hashes("single_file", small, "a" * 64) == {
        "ss_new_sd_model_hash": "a" * 64,
        "ss_sd_model_hash": __import__("hashlib").sha256(b"").hexdigest()[:8],
    }
    assert metadata.sd_model_hashes("diffusers", tmp_path, "a" * 64) == {}
    assert metadata.sd_model_hashes("builtin", tmp_path, "a" * 64) == {}
    assert metadata.sd_model_hashes("single_file", tmp_path / "gone", "a" * 64) == {
        "ss_new_sd_model_hash": "a" * 64}
