"""Samples per version, `sample` and `compare`, on the builtin tiny SD (see conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from lora_service.cli import cli
from lora_service.config import Config, load_config
from lora_service.journal import Journal
from lora_service.journal.verify import verify
from lora_service.models import render
from lora_service.store import sha256_file
from lora_service.versions import samples as s
from tests.samples.conftest import SAMPLES, Built


def rendered(state: Path, version: str) -> list[dict[str, Any]]:
    with Journal.for_state(state) as journal:
        return [
            e.payload
            for e in journal.events(types=("SamplesRendered",))
            if e.payload["version"] == version
        ]


def invoke(config: Config, *args: str) -> Any:
    return CliRunner().invoke(cli, [*args, "--config", str(config.source)])


def run_cli(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, for exit statuses and stderr (errors here never import torch)."""
    argv = [sys.executable, "-m", "lora_service", *args, "--config", str(config.source)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_samples_exist_decode_and_match_the_journal(built: Built) -> None:
    for version in ("v0001", "v0002"):
        [event] = rendered(built.state, version)
        assert event["error"] is None and event["seconds"] > 0
        assert event["settings"]["steps"] == 3 and event["settings"]["threads"] == 1
        folder = f"versions/{version}/samples"
        names = {f"{folder}/{i}-{seed}.png" for i in range(2) for seed in (0, 3)}
        assert set(event["files"]) == names | {f"{folder}/grid.png"}
        for rel, sha in event["files"].items():
            assert sha256_file(built.state / rel) == sha
            with Image.open(built.state / rel) as image:
                image.load()
                if rel.endswith("grid.png"):  # 2 seeds as columns, 2 prompts as rows
                    assert image.size == s.sheet_size(2, 2, 2, 32)
                else:
                    assert image.size == (32, 32) and image.mode == "RGB"
                assert not image.info  # no metadata chunks: bytes depend on pixels only
    with Journal.for_state(built.state) as journal:
        report = verify(journal, built.state)
        rows = journal.query("SELECT version, error FROM samples ORDER BY version")
    assert report.ok, report.problems
    assert rows == [{"version": "v0001", "error": None}, {"version": "v0002", "error": None}]


def test_rendering_again_gives_the_same_bytes(built: Built, copy_of: Config) -> None:
    """From the in-memory module (as the child) or the adapter on disk: identical files."""
    [before] = rendered(built.state, "v0001")
    with Journal.for_state(copy_of.paths.state) as journal:
        assert render.render_samples(journal, copy_of, "v0001") is None  # already there
        again = render.render_samples(journal, copy_of, "v0001", unet=built.unets["v0001"],
                                      force=True)
    assert again is not None and again.error is None
    assert again.files == before["files"]


def test_two_versions_draw_differently(built: Built) -> None:
    [one] = rendered(built.state, "v0001")
    [two] = rendered(built.state, "v0002")
    for i in range(2):
        for seed in (0, 3):
            name = f"{i}-{seed}.png"
            assert (
                one["files"][f"versions/v0001/samples/{name}"]
                != two["files"][f"versions/v0002/samples/{name}"]
            )
    # the same version, another seed or prompt: another image too
    assert len({sha for rel, sha in one["files"].items() if "grid" not in rel}) == 4


def test_sample_reproduces_a_stored_sample(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "one.png"
    result = invoke(
        built.config, "sample", "v0002", "--prompt", "a blue circle", "--seed", "3", "-o", str(out)
    )
    assert result.exit_code == 0, result.output
    assert sha256_file(out) == sha256_file(built.state / "versions/v0002/samples/1-3.png")
    assert [p.name for p in tmp_path.iterdir()] == ["one.png"]  # no temporary left behind


def test_sample_of_an_unknown_version_is_a_usage_error(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    result = run_cli(built.config, "sample", "v0042", "--prompt", "x", "-o", str(out))
    assert result.returncode == 2
    assert result.stderr == "lora-service: v0042: no such version (known: v0001, v0002)\n"
    assert not out.exists()


def _cell(sheet: Image.Image, column: int, row: int, header_lines: int = 3) -> Image.Image:
    x, y = s.cell_origin(column, row, header_lines, 32)
    side = s.cell_size(32)
    return sheet.crop((x, y, x + side, y + side))


def _upscaled(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB").resize((s.cell_size(32),) * 2, Image.Resampling.NEAREST)


def test_compare_defaults_to_head_and_parent(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(built.config, "compare")
    assert result.exit_code == 0, result.output
    out = tmp_path / "compare-v0001-v0002.png"
    with Image.open(out) as sheet:
        sheet = sheet.convert("RGB")
    rows = len(SAMPLES["prompts"]) * len(SAMPLES["seeds"])
    assert sheet.size == s.sheet_size(2, rows, 3, 32)  # 2 columns x 4 prompt-seed rows
    keys = [(i, seed) for i in range(2) for seed in (0, 3)]
    for row, (i, seed) in enumerate(keys):
        for column, version in enumerate(("v0001", "v0002")):
            stored = _upscaled(built.state / f"versions/{version}/samples/{i}-{seed}.png")
            assert _cell(sheet, column, row).tobytes() == stored.tobytes()


def test_compare_renders_what_is_not_stored(copy_of: Config, tmp_path: Path) -> None:
    """New settings (a third prompt): both versions are rendered; the old prompts' cells still
    equal the stored samples, since rendering is deterministic."""
    conf = Path(copy_of.source)  # type: ignore[arg-type]
    data = yaml.safe_load(conf.read_text())
    data["samples"]["prompts"] = [*SAMPLES["prompts"], "a green line"]
    conf.write_text(yaml.safe_dump(data))
    config = load_config(conf)
    out = tmp_path / "ab.png"
    result = invoke(config, "compare", "v0002", "v0001", "-o", str(out))
    assert result.exit_code == 0, result.output
    with Image.open(out) as sheet:
        sheet = sheet.convert("RGB")
    assert sheet.size == s.sheet_size(2, 6, 3, 32)
    stored = _upscaled(config.paths.state / "versions/v0001/samples/1-3.png")
    assert _cell(sheet, 1, 3).tobytes() == stored.tobytes()  # v0001 is column 2 here
    assert _cell(sheet, 0, 3).tobytes() != stored.tobytes()


def test_compare_needs_a_parent_or_two_names(copy_of: Config, tmp_path: Path) -> None:
    result = run_cli(copy_of, "compare", "v0009", "v0001", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "v0009: no such version" in result.stderr
    from lora_service.versions.heads import move_head

    with Journal.for_state(copy_of.paths.state) as journal:
        move_head(journal, copy_of, "v0001", reason="test", by="rollback")
    result = subprocess.run(
        [sys.executable, "-m", "lora_service", "compare", "--config", str(copy_of.source)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )  # the head v0001 has no parent to compare with
    assert result.returncode == 2
    assert result.stderr == (
        "lora-service: compare: v0001 has no parent (first of its lineage); name V1\n"
    )
    assert list(tmp_path.glob("*.png")) == []


@pytest.mark.parametrize("how", ["oom", "tampered adapter"])
def test_a_failed_render_is_journaled_and_changes_nothing_else(
    copy_of: Config, how: str
) -> None:
    state = copy_of.paths.state
    fault = None
    if how == "oom":
        def fault() -> None:
            raise MemoryError("forced by the test")
    else:
        (state / "versions/v0002/adapter/adapter_model.safetensors").write_bytes(b"broken")
    with Journal.for_state(state) as journal:
        head_before = journal.query("SELECT * FROM head")
        versions_before = journal.query("SELECT * FROM versions")
        event = render.render_samples(journal, copy_of, "v0002", force=True,
                                 fault=fault)  # must not raise
        assert event is not None and event.error
        assert ("MemoryError" if how == "oom" else "fail verification") in event.error
        assert journal.query("SELECT * FROM head") == head_before
        assert journal.query("SELECT * FROM versions") == versions_before
        assert journal.query("SELECT error FROM samples WHERE version = 'v0002'")[0]["error"]
    last = rendered(state, "v0002")[-1]
    assert last["error"] == event.error and last["files"] == {}


def test_samples_go_to_tensorboard(copy_of: Config) -> None:
    """One image tag per sample plus the grid, at the version's global step, so TensorBoard's
    slider walks through the versions."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = copy_of.model_copy(
        update={"logging": copy_of.logging.model_copy(update={"tensorboard": True})}
    )
    with Journal.for_state(config.paths.state) as journal:
        event = render.render_samples(journal, config, "v0002", force=True)
    assert event is not None and event.error is None
    [path] = (config.paths.state / "logs" / "tensorboard").glob("*.samples.v0002")
    logged = EventAccumulator(str(path), size_guidance={"images": 0})
    logged.Reload()
    tags = set(logged.Tags()["images"])
    assert tags == {"samples/grid", "samples/0-0", "samples/0-3", "samples/1-0", "samples/1-3"}
    assert [e.step for e in logged.Images("samples/1-3")] == [8]  # v0002's global step
