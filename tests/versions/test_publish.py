"""Publishing versions on a real journal: the folder, the card, the events, the gate, deploy,
moving the head by hand, and export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lora_service.config import Config, load_config
from lora_service.errors import ServiceError, UsageError
from lora_service.journal import Journal
from lora_service.store import sha256_file
from lora_service.versions.export import export_version
from lora_service.versions.heads import move_head
from lora_service.versions.verify import verify_version_files
from tests.versions.conftest import publish_version


@pytest.fixture
def deploy_config(write_config: Callable[..., Path]) -> Config:
    return load_config(
        write_config(
            {
                "name": "demo",
                "paths": {"deploy_dir": "../deploy"},
                "lora": {"rank": 4, "alpha": 8.0},
            }
        )
    )


def _types(journal: Journal, since: int) -> list[str]:
    return [e.type for e in journal.events(since=since)]


def _head(journal: Journal) -> str | None:
    rows = journal.query("SELECT version FROM head")
    return rows[0]["version"] if rows else None


def test_publish_promotes_deploys_then_holds_a_worse_version(
    deploy_config: Config,
    lora_unet: Callable[..., Any],
    start_run: Callable[..., None],
    publish_kwargs: Callable[..., dict[str, Any]],
) -> None:
    config = deploy_config
    state = config.paths.state
    journal = Journal.for_state(state)
    start_run(journal, config, "r1", None)
    before = journal.last_seq()

    v1 = publish_version(journal, config, run_id="r1", unet=lora_unet(), **publish_kwargs())
    assert v1 == "v0001"
    folder = state / "versions" / "v0001"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "card.json",
        "demo-v0001.safetensors",
    ]
    assert not [p for p in (state / "versions").iterdir() if p.name.startswith(".")]

    assert _types(journal, before) == ["VersionCreated", "HeadMoved", "VersionExported"]
    created, moved, exported = (e.event for e in journal.events(since=before))
    assert moved.by == "promotion" and moved.version == "v0001" and moved.previous is None
    assert set(created.files) == {f"versions/v0001/{n}" for n in names}
    assert verify_version_files(state, created.files) == []
    assert created.parent is None and created.batches == ("batch1",) and created.step == 4

    card = json.loads((folder / "card.json").read_text())
    assert card["version"] == "v0001" and card["parent"] is None
    assert card["batches"] == ["batch1"] and card["images"] == 2
    assert card["steps"] == 4 and card["step"] == 4 and card["seed"] == 7
    assert card["train_loss"] == 0.5 and card["val_loss_per_batch"] == {"batch1": 0.4}
    assert card["base_sha256"] == "f" * 64 and card["config"]["lora"]["alpha"] == 8.0
    assert card["files"]["demo-v0001.safetensors"] == sha256_file(folder / "demo-v0001.safetensors")

    deployed = config.paths.deploy_dir / "demo.safetensors"
    assert exported.kind == "deploy" and exported.path == str(deployed)
    assert sha256_file(deployed) == created.files["versions/v0001/demo-v0001.safetensors"]
    assert exported.sha256 == sha256_file(deployed)

    from lora_service.models.adapters import read_kohya

    _, meta = read_kohya(folder / "demo-v0001.safetensors")
    assert meta["lora_service_journal_seq"] == str(before)
    assert json.loads(meta["lora_service_config"])["lora"]["alpha"] == 8.0
    root = str(state.parent)
    assert not [k for k, v in meta.items() if root in v]  # shareable: no local paths
    assert json.loads(meta["ss_tag_frequency"]) == {"cats": {"blue": 1, "cat": 2, "red hat": 1}}
    run = journal.query("SELECT status, version FROM runs WHERE run_id = 'r1'")[0]
    assert run == {"status": "finished", "version": "v0001"}

    # publishing the same run again changes nothing
    seq = journal.last_seq()
    assert (
        publish_version(journal, config, run_id="r1", unet=lora_unet(), **publish_kwargs())
        == "v0001"
    )
    assert journal.last_seq() == seq

    # v2 from v1, 20 % worse on what v1 knew (tolerance 5 %): held, head and deploy stay
    start_run(journal, config, "r2", "v0001", start_step=4)
    before = journal.last_seq()
    v2 = publish_version(
        journal,
        config,
        run_id="r2",
        unet=lora_unet(seed=5),
        **publish_kwargs(step=8, val_loss_known=1.2, parent_val_loss_known=1.0),
    )
    assert v2 == "v0002"
    assert _types(journal, before) == ["VersionCreated", "VersionHeld"]
    held = list(journal.events(since=before))[1].event
    assert held.val_loss_known == 1.2 and held.parent_val_loss_known == 1.0
    assert "1.2" in held.reason and "held" in held.reason and held.tolerance == 0.05
    assert _head(journal) == "v0001"
    row = journal.query("SELECT held, held_reason FROM versions WHERE version = 'v0002'")[0]
    assert row["held"] == 1 and row["held_reason"] == held.reason
    assert sha256_file(deployed) == created.files["versions/v0001/demo-v0001.safetensors"]
    _, meta2 = read_kohya(state / "versions/v0002/demo-v0002.safetensors")
    assert meta2["lora_service_parent"] == "v0001"
    assert meta2["lora_service_parent_sha256"] == sha256_file(folder / "demo-v0001.safetensors")

    # promote by hand: head moves, deploy follows
    before = journal.last_seq()
    move_head(journal, config, "v0002", reason="looks fine to me", by="promote")
    assert _types(journal, before) == ["HeadMoved", "VersionExported"]
    assert _head(journal) == "v0002"
    assert sha256_file(deployed) == sha256_file(state / "versions/v0002/demo-v0002.safetensors")

    # rollback to a tampered v1 is refused, naming the file; nothing changes
    kohya = folder / "demo-v0001.safetensors"
    data = bytearray(kohya.read_bytes())
    data[-1] ^= 0xFF
    kohya.write_bytes(bytes(data))
    seq = journal.last_seq()
    with pytest.raises(UsageError, match="versions/v0001/demo-v0001.safetensors"):
        move_head(journal, config, "v0001", reason="bad data", by="rollback")
    assert journal.last_seq() == seq and _head(journal) == "v0002"
    with pytest.raises(UsageError, match="v0009: no such version"):
        move_head(journal, config, "v0009", reason="x", by="rollback")
    with pytest.raises(UsageError, match="already the head"):
        move_head(journal, config, "v0002", reason="x", by="rollback")


def test_manual_mode_holds_the_first_version_and_text_encoder_is_kept(
    write_config: Callable[..., Path],
    tiny_pipe: Callable[[], Any],
    add_lora_fn: Callable[..., Any],
    lora_unet: Callable[..., Any],
    start_run: Callable[..., None],
    publish_kwargs: Callable[..., dict[str, Any]],
) -> None:
    from lora_service.models.adapters import read_kohya

    config = load_config(write_config({"train": {"promote": "manual"}}))
    journal = Journal.for_state(config.paths.state)
    start_run(journal, config, "r1", None)
    before = journal.last_seq()
    text_encoder = add_lora_fn(
        tiny_pipe().text_encoder, rank=4, alpha=8.0, targets=["q_proj", "v_proj"], seed=3
    )
    publish_version(
        journal,
        config,
        run_id="r1",
        unet=lora_unet(),
        text_encoder=text_encoder,
        **publish_kwargs(),
    )
    assert _types(journal, before) == ["VersionCreated", "VersionHeld"]
    files = next(journal.events(since=before)).event.files
    assert "versions/v0001/adapter/text_encoder/adapter_model.safetensors" in files
    tensors, _ = read_kohya(config.paths.state / "versions/v0001/lora-service-v0001.safetensors")
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)
    assert _head(journal) is None
    move_head(journal, config, "v0001", reason="ok", by="promote")
    assert _head(journal) == "v0001"  # no deploy_dir: no VersionExported
    assert _types(journal, before)[-1] == "HeadMoved"


def test_a_version_whose_parent_left_the_head_is_held(
    write_config: Callable[..., Path],
    lora_unet: Callable[..., Any],
    start_run: Callable[..., None],
    publish_kwargs: Callable[..., dict[str, Any]],
) -> None:
    config = load_config(write_config({"train": {"promote": "always"}}))
    journal = Journal.for_state(config.paths.state)
    start_run(journal, config, "r1", None)
    publish_version(journal, config, run_id="r1", unet=lora_unet(), **publish_kwargs())
    start_run(journal, config, "r2", "v0001")
    publish_version(journal, config, run_id="r2", unet=lora_unet(), **publish_kwargs())
    start_run(journal, config, "r3", "v0002")  # trains from v0002 while it is the head ...
    move_head(journal, config, "v0001", reason="v2 was bad", by="rollback")  # ... rollback
    publish_version(journal, config, run_id="r3", unet=lora_unet(), **publish_kwargs())
    assert _head(journal) == "v0001"
    row = journal.query("SELECT held, held_reason FROM versions WHERE version = 'v0003'")[0]
    assert row["held"] == 1 and "head moved to v0001" in row["held_reason"]


def test_export_writes_atomically_and_refuses_to_overwrite(
    tmp_path: Path,
    config: Config,
    lora_unet: Callable[..., Any],
    tiny_pipe: Callable[[], Any],
    start_run: Callable[..., None],
    publish_kwargs: Callable[..., dict[str, Any]],
) -> None:
    import torch

    from lora_service.models.adapters import load_peft_into, peft_unet_state_dict

    journal = Journal.for_state(config.paths.state)
    start_run(journal, config, "r1", None)
    unet = lora_unet()
    publish_version(journal, config, run_id="r1", unet=unet, **publish_kwargs())
    state = config.paths.state
    src = state / "versions/v0001" / f"{config.name}-v0001.safetensors"

    out = tmp_path / "out.safetensors"
    assert export_version(journal, config, "v0001", "kohya", out) == out
    assert sha256_file(out) == sha256_file(src)
    with pytest.raises(UsageError, match="exists; pass --force"):
        export_version(journal, config, "v0001", "kohya", out)
    out.write_bytes(b"old")
    export_version(journal, config, "v0001", "kohya", out, force=True)
    assert sha256_file(out) == sha256_file(src)
    into = tmp_path / "into"
    into.mkdir()
    assert export_version(journal, config, "v0001", "kohya", into) == into / src.name

    peft_out = tmp_path / "peft"
    export_version(journal, config, "v0001", "peft", peft_out)
    with pytest.raises(UsageError, match="exists"):
        export_version(journal, config, "v0001", "peft", peft_out)
    (peft_out / "stale.txt").write_text("x")
    export_version(journal, config, "v0001", "peft", peft_out, force=True)
    assert sorted(p.name for p in peft_out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    fresh = tiny_pipe().unet
    load_peft_into(fresh, peft_out)
    want, got = peft_unet_state_dict(unet), peft_unet_state_dict(fresh)
    assert all(torch.equal(got[k], want[k]) for k in want)

    kinds = journal.query("SELECT kind, format FROM exports ORDER BY seq")
    assert kinds[0] == {"kind": "export", "format": "kohya"}
    assert kinds[-1] == {"kind": "export", "format": "peft"}

    with pytest.raises(UsageError, match="no such version"):
        export_version(journal, config, "v0002", "kohya", tmp_path / "x.safetensors")
    (state / "versions/v0001/adapter/adapter_model.safetensors").write_bytes(b"torn")
    with pytest.raises(ServiceError, match="adapter/adapter_model.safetensors"):
        export_version(journal, config, "v0001", "peft", tmp_path / "p2")
    assert not (tmp_path / "p2").exists()


def test_an_unjournaled_folder_is_replaced_and_a_failed_deploy_keeps_the_version(
    write_config: Callable[..., Path],
    lora_unet: Callable[..., Any],
    start_run: Callable[..., None],
    publish_kwargs: Callable[..., dict[str, Any]],
) -> None:
    config = load_config(write_config({"paths": {"deploy_dir": "../deploy"}}))
    state = config.paths.state
    # deploy_dir is a file: every copy into it fails
    config.paths.deploy_dir.parent.mkdir(parents=True, exist_ok=True)
    config.paths.deploy_dir.write_text("not a folder")
    journal = Journal.for_state(state)
    start_run(journal, config, "r1", None)
    orphan = state / "versions" / "v0001"  # a publish that died between rename and append
    orphan.mkdir(parents=True)
    (orphan / "junk").write_text("x")
    before = journal.last_seq()
    assert (
        publish_version(journal, config, run_id="r1", unet=lora_unet(), **publish_kwargs())
        == "v0001"
    )
    assert _types(journal, before) == ["VersionCreated", "HeadMoved"]  # no VersionExported
    assert not (orphan / "junk").exists()
    created = next(journal.events(since=before)).event
    assert verify_version_files(state, created.files) == []

    start_run(journal, config, "r2", "v0001")
    publish_version(journal, config, run_id="r2", unet=lora_unet(), **publish_kwargs())
    with pytest.raises(ServiceError, match="head moved to v0001, but the deploy failed"):
        move_head(journal, config, "v0001", reason="back", by="rollback")
    assert _head(journal) == "v0001"
