"""The two on-disk formats: the kohya file loads back in diffusers with the same output as the
trained peft model (alpha != rank, so the converter's alpha = rank trap would show), and the
peft layout round-trips bit-exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import lora_service.torch_compat  # noqa: F401

# isort: split
import safetensors
import torch
from diffusers.utils import convert_state_dict_to_kohya

from lora_service.versions import export

RANK, ALPHA = 4, 8.0
SS_KEYS = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_base_model_version",
    "ss_sd_model_hash",
    "ss_new_sd_model_hash",
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
    return export.ss_metadata(
        output_name="demo-v0001",
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

    unet_state = export.peft_unet_state_dict(trained.unet)
    te_state = export.peft_state_dict(trained.text_encoder)
    tensors = export.to_kohya(unet_state, alpha=ALPHA, text_encoder_state=te_state)
    manifest = {"batches/b/a.png": "a" * 64, "batches/b/a.txt": "b" * 64}
    path = tmp_path / "demo-v0001.safetensors"
    sha = export.write_kohya(path, tensors, _metadata(manifest))
    assert sha == __import__("hashlib").sha256(path.read_bytes()).hexdigest()

    keys = sorted(tensors)
    assert any(k.startswith("lora_unet_") and k.endswith("_to_q.lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te1_") and k.endswith("_q_proj.lora_up.weight") for k in keys)
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
    files = export.write_peft(tmp_path / "adapter", unet)
    assert set(files) == {"adapter_model.safetensors", "adapter_config.json"}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert sorted(config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    stored = safetensors.torch.load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in stored)

    fresh = tiny_pipe().unet  # no adapter yet: injected from adapter_config.json
    export.load_peft_into(fresh, tmp_path / "adapter")
    want = export.peft_unet_state_dict(unet)
    got = export.peft_unet_state_dict(fresh)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key

    # a UNet whose adapter the trainer already built: same geometry loads, other rank refuses
    built = lora_unet(rank=RANK, alpha=ALPHA, seed=9)
    export.load_peft_into(built, tmp_path / "adapter")
    assert all(torch.equal(export.peft_unet_state_dict(built)[k], want[k]) for k in want)
    other = lora_unet(rank=2, alpha=ALPHA)
    with pytest.raises(ValueError, match="r 2"):
        export.load_peft_into(other, tmp_path / "adapter")


def test_peft_layout_is_readable_by_peft_itself(
    tmp_path: Path, lora_unet: Callable[..., Any], tiny_pipe: Callable[[], Any]
) -> None:
    from peft import PeftModel

    unet = lora_unet(rank=RANK, alpha=ALPHA)
    export.write_peft(tmp_path / "adapter", unet)
    model = PeftModel.from_pretrained(tiny_pipe().unet, str(tmp_path / "adapter"))
    got = export.peft_state_dict(model)
    want = export.peft_unet_state_dict(unet)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
