"""`versions`, `loss`, `audit`, `rollback`, `promote`, `requeue`, `export` on a real trained
history: v1 (batch A), v2 (batch B), rollback to v1, v3 (batch C) from v1."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from lora_service.journal import Journal, queries

from .conftest import Scenario, _train, lora, lora_json

VERSION_FIELDS = {"version", "parent", "created_at", "batches", "images", "step", "steps",
                  "train_loss", "val_loss", "val_loss_per_batch", "head", "held"}


def test_versions_shows_the_tree_after_a_rollback(scenario: Scenario) -> None:
    rows = lora_json("versions", config=scenario.config)
    assert [r["version"] for r in rows] == ["v0001", "v0002", "v0003"]
    assert all(VERSION_FIELDS <= set(r) for r in rows)
    v1, v2, v3 = rows
    assert (v1["parent"], v2["parent"], v3["parent"]) == (None, "v0001", "v0001")
    assert [r["head"] for r in rows] == [False, False, True]
    assert [r["in_head_lineage"] for r in rows] == [True, False, True]
    assert v1["batches"] == [scenario.a] and v2["new_batches"] == [scenario.b]
    assert v3["new_batches"] == [scenario.c] and scenario.b not in v3["batches"]
    # the global step continues the parent's: v2 and v3 both start where v1 ended
    assert v2["step"] - v2["steps"] == v1["step"] == v3["step"] - v3["steps"]
    assert v1["val_loss"] is not None and set(v3["val_loss_per_batch"]) == {scenario.a,
                                                                             scenario.c}
    text = lora("versions", config=scenario.config)
    assert text.returncode == 0, text.stderr
    assert "└─ v0002" in text.stdout and "└─ v0003" in text.stdout
    assert "off lineage" in text.stdout and "head" in text.stdout


def test_audit_v3_lineage_back_to_the_base_without_b(scenario: Scenario) -> None:
    record = lora_json("audit", "v0003", config=scenario.config)
    assert [v["version"] for v in record["lineage"]] == ["v0003", "v0001"]
    assert [v["parent"] for v in record["lineage"]] == ["v0001", None]
    with Journal.for_state(scenario.state) as journal:
        base = journal.query("SELECT sha256, spec FROM base_models")
        accepted = {r["batch_id"]: r for r in journal.query("SELECT * FROM batch_images")}
    assert record["base_model"]["sha256"] == base[0]["sha256"]
    assert record["base_model"]["spec"] == "builtin:tiny-sd" and record["base_model"]["files"]
    trained = {b["batch_id"] for v in record["lineage"] for b in v["batches"]}
    assert trained == {scenario.a, scenario.c}  # B left the lineage with the rollback
    v3 = record["lineage"][0]
    images = [i for b in v3["batches"] for i in b["images"]]
    assert len(images) == 8 and accepted
    assert all(len(i["sha256"]) == 64 and i["caption"] and i["caption_source"] == "sidecar"
               for i in images)
    assert v3["config"]["lora"]["rank"] == 4 and record["config"] == v3["config"]
    assert record["seed"] == v3["seed"] == 0
    types = [e["type"] for e in v3["events"]]
    assert types[0] == "RunStarted" and "VersionCreated" in types and "HeadMoved" in types
    assert all(len(e["hash"]) == 64 and e["seq"] > 0 for e in v3["events"])
    v1_moves = [e for e in record["lineage"][1]["events"] if e["type"] == "HeadMoved"]
    assert [e["payload"]["by"] for e in v1_moves] == ["promotion", "rollback"]
    assert record["verification"]["ok"] and record["verification"]["problems"] == []
    assert record["verification"]["checked"] >= 8 + 8  # 2 versions' files + 8 images, + base

    text = lora("audit", "v0003", config=scenario.config)
    assert text.returncode == 0, text.stderr
    assert "lineage: v0003 -> v0001 -> base" in text.stdout
    assert scenario.b not in text.stdout and "verification:" in text.stdout


def test_loss_json_and_a_readable_plot(scenario: Scenario, tmp_path: Path) -> None:
    plot = tmp_path / "loss.png"
    series = lora_json("loss", "--plot", str(plot), config=scenario.config)
    assert series["version"] == "v0003" and series["lineage"] == ["v0001", "v0003"]
    assert {"version", "train_loss", "val_loss", "val_loss_per_batch", "step", "steps"} <= set(
        series["versions"][0])
    points = series["points"]
    assert points and {"step", "loss", "lr", "run_id", "version"} <= set(points[0])
    assert {p["version"] for p in points} == {"v0001", "v0003"}
    steps = [p["step"] for p in points]
    assert steps == sorted(steps) and steps[-1] == series["versions"][-1]["step"]
    with Image.open(plot) as im:
        im.load()
        assert im.format == "PNG" and im.size == (1200, 600)
    shutil.copy(plot, Path("/tmp") / "lora-service-history-loss.png")  # for a person to look at

    v2 = lora_json("loss", "--version", "v0002", config=scenario.config)
    assert v2["lineage"] == ["v0001", "v0002"]
    assert {p["version"] for p in v2["points"]} == {"v0001", "v0002"}
    text = lora("loss", config=scenario.config)
    assert text.returncode == 0 and "v0003 (head)" in text.stdout
    unknown = lora("loss", "--version", "v0099", config=scenario.config)
    assert unknown.returncode == 2 and "v0099: no such version" in unknown.stderr
    nowhere = lora("loss", "--plot", str(tmp_path / "no" / "x.png"), config=scenario.config)
    assert nowhere.returncode == 2 and "no such folder" in nowhere.stderr


def test_head_moves_refuse_bad_input(scenario_copy: Scenario) -> None:
    config = scenario_copy.config
    for args in (("rollback", "v0099", "--reason", "x"), ("promote", "v0099"),
                 ("rollback", "v0003", "--reason", "already")):
        result = lora(*args, config=config)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    missing_reason = lora("rollback", "v0002", config=config)
    assert missing_reason.returncode == 2 and "--reason" in missing_reason.stderr
    promoted = lora("promote", "v0002", config=config)
    assert promoted.returncode == 0 and "v0003 -> v0002" in promoted.stdout
    with Journal.for_state(scenario_copy.state) as journal:
        assert queries.head_version(journal) == "v0002"
        assert journal.query("SELECT moved_by FROM head")[0]["moved_by"] == "promote"


def test_requeue_brings_b_back_into_v4(scenario_copy: Scenario) -> None:
    config = scenario_copy.config
    rows = {r["batch_id"]: r for r in lora_json("batches", config=config)}
    assert rows[scenario_copy.b]["status"] == "out of lineage"
    requeued = lora("requeue", scenario_copy.b, "--reason", "relabelled", config=config)
    assert requeued.returncode == 0, requeued.stderr
    _train(config)
    v4 = lora_json("versions", config=config)[-1]
    assert v4["version"] == "v0004" and v4["parent"] == "v0003" and v4["head"]
    assert v4["new_batches"] == [scenario_copy.b]
    record = lora_json("audit", "v0004", config=config)
    assert [v["version"] for v in record["lineage"]] == ["v0004", "v0003", "v0001"]
    assert scenario_copy.b in {b["batch_id"] for b in record["lineage"][0]["batches"]}


def test_audit_names_a_tampered_image_and_adapter(scenario_copy: Scenario) -> None:
    config, state = scenario_copy.config, scenario_copy.state
    image = state / "batches" / scenario_copy.c / "img1.png"
    original = image.read_bytes()
    image.write_bytes(original[:-10] + b"0123456789")
    result = lora("audit", "v0003", config=config)
    assert result.returncode == 1
    assert f"batches/{scenario_copy.c}/img1.png: sha256" in result.stderr
    assert "Traceback" not in result.stderr
    as_json = lora("audit", "v0003", "--json", config=config)
    assert as_json.returncode == 1
    check = json.loads(as_json.stdout)["verification"]
    assert not check["ok"] and len(check["problems"]) == 1
    image.write_bytes(original)

    adapter = state / "versions" / "v0001" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes() + b"\0")
    result = lora("audit", "v0003", config=config)  # an ancestor's file counts as well
    assert result.returncode == 1
    assert "versions/v0001/adapter/adapter_model.safetensors: sha256" in result.stderr
    refused = lora("rollback", "v0001", "--reason", "x", config=config)
    assert refused.returncode == 2
    assert "versions/v0001/adapter/adapter_model.safetensors" in refused.stderr
    assert lora("audit", "v0002", config=config).returncode == 1  # v2 is a child of v1 too


def test_export_kohya_and_peft(scenario_copy: Scenario, tmp_path: Path) -> None:
    config = scenario_copy.config
    out = tmp_path / "v3.safetensors"
    done = lora("export", "v0003", "--format", "kohya", "-o", str(out), config=config)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == (
        scenario_copy.state / "versions" / "v0003" / "lora-service-v0003.safetensors"
    ).read_bytes()
    again = lora("export", "v0003", "-o", str(out), config=config)
    assert again.returncode == 2 and "--force" in again.stderr
    assert lora("export", "v0001", "-o", str(out), "--force", config=config).returncode == 0
    peft = tmp_path / "peft"
    done = lora("export", "v0003", "--format", "peft", "-o", str(peft), config=config)
    assert done.returncode == 0, done.stderr
    assert (peft / "adapter_model.safetensors").is_file()
    assert (peft / "adapter_config.json").is_file()
    unknown = lora("export", "v0042", "-o", str(tmp_path / "x"), config=config)
    assert unknown.returncode == 2 and "no such version" in unknown.stderr


def test_an_empty_history(write_config: Callable[..., Path], tmp_path: Path) -> None:
    config = write_config()
    Journal.for_state(tmp_path / "state").close()  # what the daemon's first start leaves
    assert lora_json("versions", config=config) == []
    series = lora_json("loss", config=config)
    assert series == {"version": None, "lineage": [], "versions": [], "points": [],
                      "downsampled": None}
    plot = lora("loss", "--plot", str(tmp_path / "x.png"), config=config)
    assert plot.returncode == 1 and "nothing to plot" in plot.stderr
    assert not (tmp_path / "x.png").exists()
    assert lora("audit", "v0001", config=config).returncode == 2
