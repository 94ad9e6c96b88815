"""`lora-service import`: an adapter trained elsewhere becomes a lineage root that the next run
continues from (issue 13, item 5, and the seed articles' front/side case).

"Elsewhere" is another state folder: a tiny version trained there on "front" images and
exported with `lora-service export` (kohya and peft), the way a user brings a file from another
machine. Everything is real: the CLI and the import and training children as processes, the
files as written. Refusals are checked in-process (the same function the child runs) and once
through the CLI for the exit status and the one line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lora_service.models.torch_compat  # noqa: F401

# isort: split
import torch
from safetensors.torch import load_file, save_file

from lora_service.config import Config
from lora_service.daemon.foreground import train_now
from lora_service.daemon.plan import plan_run
from lora_service.errors import UsageError
from lora_service.journal import Journal
from lora_service.store import sha256_file
from lora_service.training.run import RunContext, find_run
from tests.history.conftest import lora
from tests.training.conftest import add_batch, write_tiny_config

LORA = {"rank": 4, "alpha": 8}  # alpha != rank: a lost alpha would show
FRONT = {"epochs": 2, "learning_rate": 2e-4, "save_steps": 100}
# the seeds' increment: 2e-4 -> 8e-5 (x 0.4, the default), at most 5 epochs
SIDE = {"epochs": 10, "incremental_epochs": 5, "learning_rate": 2e-4, "save_steps": 100,
        "rehearsal_ratio": 0.0}
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Front:
    kohya: Path  # `export --format kohya` of the front version
    peft: Path  # `export --format peft` of it
    adapter: dict[str, torch.Tensor]  # the version's trained peft tensors, by module path


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PEFT_PREFIX): v
            for k, v in load_file(folder / "adapter_model.safetensors").items()}


def _fresh(root: Path, tiny_base: Path, train: dict, **lora_cfg: object) -> Config:
    """A config and an empty state (the builtin base copied in) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    config = write_tiny_config(root, train, lora={**LORA, **lora_cfg})
    shutil.copytree(tiny_base, config.paths.state / "base")
    return config


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builtin tiny base, materialised once and copied into each state."""
    from lora_service.models.base_model import materialise

    state = tmp_path_factory.mktemp("base-state")
    materialise("builtin:tiny-sd", state)
    return state / "base"


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Front:
    """A LoRA trained elsewhere: v0001 of another state, on "front" images, exported."""
    root = tmp_path_factory.mktemp("elsewhere")
    config = _fresh(root, tiny_base, FRONT)
    add_batch(config.paths.state, "front", n=4, seed=0)
    assert train_now(config) == 0
    out = tmp_path_factory.mktemp("download")
    for fmt, target in (("kohya", out / "front.safetensors"), ("peft", out / "front-peft")):
        done = lora("export", "v0001", "--format", fmt, "-o", str(target), config=config.source)
        assert done.returncode == 0, done.stderr
    adapter = _adapter(config.paths.state / "versions/v0001/adapter")
    return Front(out / "front.safetensors", out / "front-peft", adapter)


@dataclass(frozen=True)
class Side:
    config: Config
    imported: str  # stdout of `lora-service import`


@pytest.fixture(scope="module")
def side(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, front: Front) -> Side:
    """A fresh state: `import` the front kohya file, then a batch of "side" images trains."""
    config = _fresh(tmp_path_factory.mktemp("here"), tiny_base, SIDE)
    done = lora("import", str(front.kohya), config=config.source)
    assert done.returncode == 0, done.stderr
    status = lora("status", config=config.source).stdout
    assert "unverified: v0001 has no validation loss (imported; not validated here)" in status
    add_batch(config.paths.state, "side", n=4, seed=5)
    assert train_now(config) == 0
    return Side(config, done.stdout)


def _card(state: Path, version: str) -> dict:
    return json.loads((state / "versions" / version / "card.json").read_text())


def test_the_next_run_continues_from_the_imported_weights(side: Side, front: Front) -> None:
    """Item 5: the new version's parent is the imported one, and its run starts from exactly
    the weights trained elsewhere (the kohya file converted back, bit for bit)."""
    config, state = side.config, side.config.paths.state
    assert "as v0001" in side.imported and "head: - -> v0001" in side.imported
    with Journal.for_state(state) as journal:
        (event,) = [e.payload for e in journal.events(types=("VersionImported",))]
        run = find_run(journal, "r0001")
        assert run.parent == "v0001"
        start = RunContext(config, journal, run).trainer.adapter_state()
    assert event["version"] == "v0001" and event["format"] == "kohya"
    assert event["origin"] == "front.safetensors"  # the name only: no local path
    assert str(front.kohya.parent) not in json.dumps(event)
    assert event["sha256"] == sha256_file(front.kohya)
    assert event["geometry"] == {"rank": 4, "alpha": 8.0, "train_text_encoder": False,
                                 "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    assert start.keys() == front.adapter.keys()
    assert all(torch.equal(start[k], front.adapter[k]) for k in start)
    # stored as a version like any other: the peft layout holds the same tensors
    stored = _adapter(state / "versions/v0001/adapter")
    assert all(torch.equal(stored[k], front.adapter[k]) for k in front.adapter)
    assert _card(state, "v0002")["parent"] == "v0001"
    assert lora("verify", config=config.source).returncode == 0


def test_seed_articles_case_front_imported_then_side_at_reduced_lr(
    side: Side, front: Front
) -> None:
    """The seeds' case: a kohya file trained elsewhere ("front") is the lineage root; "side"
    images train v2 from it at 0.4x the learning rate and at most 5 epochs; `audit v2` shows
    the imported parent with its file hash, the learning rate and the epochs."""
    config, state = side.config, side.config.paths.state
    v2 = _card(state, "v0002")
    assert v2["parent"] == "v0001" and v2["start_step"] == 0
    assert v2["learning_rate"] == pytest.approx(0.4 * 2e-4)
    assert v2["epochs"] == 5
    sha = sha256_file(front.kohya)
    audit = lora("audit", "v0002", config=config.source)
    assert audit.returncode == 0, audit.stderr
    assert "lineage: v0002 -> v0001 -> base" in audit.stdout
    assert f"v0001: imported front.safetensors (kohya, sha256 {sha})" in audit.stdout
    assert "v0002: parent v0001" in audit.stdout
    assert "lr 8e-05" in audit.stdout and "epochs 5" in audit.stdout
    record = json.loads(lora("audit", "v0002", "--json", config=config.source).stdout)
    root = record["lineage"][1]
    assert root["imported"]["sha256"] == sha and root["imported"]["format"] == "kohya"
    assert [e["type"] for e in root["events"]][:2] == ["VersionImported", "HeadMoved"]
    assert record["lineage"][0]["learning_rate"] == pytest.approx(8e-5)
    assert record["lineage"][0]["epochs"] == 5


# -- refusals --------------------------------------------------------------------------------


def _import(config: Config, path: Path) -> dict:
    """What the import child runs, in-process (faster than a child per case)."""
    from lora_service.models.importing import import_adapter

    with Journal.for_state(config.paths.state) as journal:
        return import_adapter(journal, config, path)


def _refused(config: Config, path: Path, match: str, fmt: str | None = None) -> None:
    from lora_service.models.importing import import_adapter

    with Journal.for_state(config.paths.state) as journal:
        with pytest.raises(UsageError, match=match):
            import_adapter(journal, config, path, fmt)  # type: ignore[arg-type]
        assert not journal.query("SELECT * FROM versions")
    assert not (config.paths.state / "versions").exists()


def test_a_mismatch_is_refused_by_name_and_nothing_is_stored(
    front: Front, tmp_path: Path, tiny_base: Path
) -> None:
    """Rank, alpha, targets, text encoder, another base model: each named, nothing stored."""
    cases = [
        ({"rank": 8}, r"^lora\.rank is 8 but front\.safetensors has rank 4; set lora\.rank: 4"),
        ({"alpha": 4}, r"^lora\.alpha is 4 but front\.safetensors has alpha 8"),
        ({"target_modules": ["to_q", "to_k", "to_v"]},
         r"^lora\.target_modules is to_k,to_q,to_v but front\.safetensors adapts "
         r"to_k,to_out\.0,to_q,to_v"),
        ({"train_text_encoder": True},
         r"^lora\.train_text_encoder is true but front\.safetensors has no text-encoder LoRA"),
    ]
    for i, (lora_cfg, match) in enumerate(cases):
        _refused(_fresh(tmp_path / f"c{i}", tiny_base, SIDE, **lora_cfg), front.kohya, match)

    # a base model whose weights differ: our kohya files name the base they were trained on
    from lora_service.models.base_model import build_tiny_sd

    pipe = build_tiny_sd()
    with torch.no_grad():
        pipe.unet.conv_in.bias.add_(1.0)
    pipe.save_pretrained(tmp_path / "other-base")
    other = write_tiny_config(tmp_path / "other", SIDE, lora=LORA,
                              base_model=str(tmp_path / "other-base"))
    _refused(other, front.kohya, r"^base_model: front\.safetensors was trained on base sha256")

    # a LoRA for a model of another shape (cross-attention over 64 features, not 32)
    tensors = load_file(front.kohya)
    key = next(k for k in sorted(tensors) if "attn2_to_k.lora_down" in k)
    tensors[key] = torch.zeros(4, 64)
    save_file(tensors, tmp_path / "wide.safetensors")  # no metadata: only the shapes tell
    config = _fresh(tmp_path / "wide", tiny_base, SIDE)
    _refused(config, tmp_path / "wide.safetensors",
             r"^base_model: wide\.safetensors's .*attn2\.to_k maps 64 -> 32 features, the base "
             r"model's layer 32 -> 32")

    # not a LoRA file we read, or not the format asked for
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    _refused(config, tmp_path / "model.ckpt", r"only \.safetensors files are imported")
    _refused(config, front.kohya, r"^--format peft, but front\.safetensors holds a kohya",
             fmt="peft")


def test_cli_refusal_is_one_line_exit_2(front: Front, tmp_path: Path, tiny_base: Path) -> None:
    config = _fresh(tmp_path, tiny_base, SIDE, rank=8)
    done = lora("import", str(front.kohya), config=config.source)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "lora-service: import front.safetensors: lora.rank is 8 but front.safetensors has "
        "rank 4; set lora.rank: 4 to import it"
    ]
    assert not (config.paths.state / "versions").exists()
    with Journal.for_state(config.paths.state, mode="read") as journal:
        assert not list(journal.events())  # not even the base model's registration


# -- peft ------------------------------------------------------------------------------------


def test_peft_folder_and_diffusers_file_import(
    front: Front, tmp_path: Path, tiny_base: Path
) -> None:
    """A peft adapter folder (`export --format peft`) and diffusers' own
    `pytorch_lora_weights.safetensors` (written by `save_lora_weights`, alpha in its metadata)
    import to the same tensors; without stated alpha, diffusers' default (alpha = rank) is
    what the file means, and it does not fit alpha 8."""
    from diffusers import StableDiffusionPipeline

    config = _fresh(tmp_path / "peft", tiny_base, SIDE)
    done = _import(config, front.peft)
    assert done["format"] == "peft" and done["origin"] == "front-peft"
    assert done["sha256"] == sha256_file(front.peft / "adapter_model.safetensors")
    stored = _adapter(config.paths.state / "versions/v0001/adapter")
    assert stored.keys() == front.adapter.keys()
    assert all(torch.equal(stored[k], front.adapter[k]) for k in stored)
    # the imported root's geometry binds the next run as a trained head's does
    add_batch(config.paths.state, "side", n=2, seed=5)
    rank8 = write_tiny_config(tmp_path / "rank8", SIDE, lora={**LORA, "rank": 8})
    with Journal.for_state(config.paths.state) as journal:
        with pytest.raises(UsageError, match=r"^lora\.rank is 8 but head v0001 .* rank 4"):
            plan_run(journal, rank8)
        assert plan_run(journal, config).parent == "v0001"

    peft_config = json.loads((front.peft / "adapter_config.json").read_text())
    for name, meta in (("stated", peft_config), ("unstated", None)):
        folder = tmp_path / name
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=front.adapter, unet_lora_adapter_metadata=meta
        )
        weights = folder / "pytorch_lora_weights.safetensors"
        assert next(iter(load_file(weights))).startswith("unet.")
        config = _fresh(tmp_path / f"d-{name}", tiny_base, SIDE)
        if meta is None:
            _refused(config, weights, r"^lora\.alpha is 8 but pytorch_lora_weights\.safetensors "
                                      r"has alpha 4")
            continue
        done = _import(config, weights)
        assert done["format"] == "peft" and done["alpha"] == 8.0
        stored = _adapter(config.paths.state / "versions/v0001/adapter")
        assert all(torch.equal(stored[k], front.adapter[k]) for k in front.adapter)


def test_text_encoder_lora_in_kohya_and_our_naming(
    tiny_base: Path, tmp_path: Path, tiny_pipe: Callable[[], Any], add_lora_fn: Callable[..., Any]
) -> None:
    """A kohya file with text-encoder LoRA, its keys as kohya, ComfyUI and WebUI files name
    them (`lora_te_text_model_encoder_…`) or as our earlier files did (`lora_te1_encoder_…`),
    imports to the same UNet and text-encoder tensors."""
    from lora_service.models import adapters
    from tests.versions.conftest import TE_TARGETS, UNET_TARGETS

    pipe = tiny_pipe()
    add_lora_fn(pipe.unet, rank=4, alpha=8.0, targets=UNET_TARGETS, seed=1)
    add_lora_fn(pipe.text_encoder, rank=4, alpha=8.0, targets=TE_TARGETS, seed=2)
    unet, te = adapters.peft_state_dict(pipe.unet), adapters.peft_state_dict(pipe.text_encoder)
    tensors = adapters.to_kohya(unet, alpha=8.0, text_encoder_state=te)
    for i, prefix in enumerate(("lora_te_text_model_", "lora_te1_")):
        named = {}
        for key, value in tensors.items():
            for old in ("lora_te_text_model_", "lora_te1_"):
                if key.startswith(old):
                    key = prefix + key.removeprefix(old)
            named[key] = value
        assert sum(k.startswith(prefix) for k in named) == 3 * len(te) // 2
        save_file(named, tmp_path / f"te{i}.safetensors")
        config = _fresh(tmp_path / f"s{i}", tiny_base, SIDE, train_text_encoder=True)
        assert _import(config, tmp_path / f"te{i}.safetensors")["text_encoder"] is True
        adapter = config.paths.state / "versions/v0001/adapter"
        assert _adapter(adapter).keys() == unet.keys()
        assert all(torch.equal(_adapter(adapter)[k], unet[k]) for k in unet)
        stored = _adapter(adapter / "text_encoder")
        assert stored.keys() == te.keys() and all(torch.equal(stored[k], te[k]) for k in te)
