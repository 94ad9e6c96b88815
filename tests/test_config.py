"""Configuration: defaults, path resolution, and one-line errors that name the key (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_service.config import load_config
from lora_service.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load() -> None:
    default = load_config(ROOT / "daemon/config.yaml")
    assert default.base_model == "builtin:tiny-sd"
    assert default.paths.inbox == ROOT / "inbox"
    assert default.paths.state == ROOT / "state"
    example = load_config(ROOT / "daemon/config.example-sd15.yaml")
    assert example.base_model.endswith("stable-diffusion-v1-5")
    assert example.train.incremental_lr_factor == 0.4


def test_relative_paths_resolve_against_the_config_folder(
    write_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config({"paths": {"deploy_dir": "out/loras"}})
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.paths.state == tmp_path / "state"
    assert config.paths.deploy_dir == tmp_path / "conf" / "out" / "loras"


def test_durations_parse(write_config: Callable[..., Path]) -> None:
    assert load_config(write_config({"schedule": {"interval": "10m"}})).schedule.interval == 600


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train": {"learning_rat": 1e-4}}, "train.learning_rat: unknown key"),
        ({"trian": {}}, "trian: unknown key"),
        (
            {"train": {"batch_size": "four"}},
            "train.batch_size: 'four' — Input should be a valid integer",
        ),
        (
            {"train": {"learning_rate": -1}},
            "train.learning_rate: -1 — Input should be greater than 0",
        ),
        (
            {"train": {"promote": "sometimes"}},
            "train.promote: 'sometimes' — Input should be 'always'",
        ),
        ({"train": {"resolution": 30}}, "train.resolution: 30 — Input should be a multiple of 8"),
        ({"schedule": {"cron": "every day"}}, "schedule.cron: 'every day' — is not a crontab line"),
        ({"schedule": {"interval": "soon"}}, "schedule.interval: 'soon' — must be seconds"),
        ({"labelling": {"enabled": True}}, "labelling.enabled needs labelling.weights"),
    ],
)
def test_bad_values_name_the_key(
    write_config: Callable[..., Path], overrides: dict, expected: str
) -> None:
    with pytest.raises(UsageError) as info:
        load_config(write_config(overrides))
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(UsageError, match="not valid YAML at line"):
        load_config(bad)


def test_cli_reports_config_errors_in_one_line_with_exit_2(
    write_config: Callable[..., Path],
) -> None:
    path = write_config({"train": {"rank": 8}})
    result = subprocess.run(
        [sys.executable, "-m", "lora_service", "status", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "train.rank: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (path.parent.parent / "state").exists()  # nothing was created
