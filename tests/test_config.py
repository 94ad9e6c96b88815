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
    shapes = load_config(ROOT / "daemon/config.example-shapes.yaml")
    assert shapes.base_model == "builtin:shapes-sd" and shapes.paths.state == ROOT / "state-shapes"
    assert all(" on a " in p for p in shapes.samples.prompts)  # prompts of its world: judged


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


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lora_service", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("paths", "keys"),
    [
        ({"state": "../inbox/state"}, ("paths.state", "paths.inbox")),
        ({"state": "../inbox"}, ("paths.state", "paths.inbox")),
        ({"inbox": "../state/inbox"}, ("paths.inbox", "paths.state")),
        ({"deploy_dir": "../state/deploy"}, ("paths.deploy_dir", "paths.state")),
        ({"deploy_dir": "../inbox"}, ("paths.inbox", "paths.deploy_dir")),
    ],
)
def test_state_inbox_and_deploy_must_not_contain_one_another(
    write_config: Callable[..., Path], paths: dict[str, str], keys: tuple[str, str]
) -> None:
    """A state inside the inbox would be scanned as a batch and moved into `.rejected/`."""
    path = write_config({"paths": paths})
    result = _cli("status", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert all(key in result.stderr for key in keys), result.stderr
    assert not (path.parent.parent / "state").exists()


def test_a_symlinked_state_inside_the_inbox_is_refused(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "inbox" / "s").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "inbox" / "s")
    with pytest.raises(UsageError, match=r"paths.state .* is inside paths.inbox"):
        load_config(write_config({"paths": {"state": "../link"}}))


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a b", "caf\u00e9"])
def test_name_must_be_a_safe_file_name_stem(write_config: Callable[..., Path], name: str) -> None:
    with pytest.raises(UsageError, match="name: .* must be a file-name stem"):
        load_config(write_config({"name": name}))


def test_safe_names_load(write_config: Callable[..., Path]) -> None:
    assert load_config(write_config({"name": "sd15-style_v2.1"})).name == "sd15-style_v2.1"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"paths": {"state": "../st\0ate"}}, "paths.state"),
        ({"paths": {"deploy_dir": "/tmp/d\0"}}, "paths.deploy_dir"),
        ({"base_model": "/models/sd\0.safetensors"}, "base_model"),
        ({"logging": {"file": "log\0.txt"}}, "logging.file"),
    ],
)
def test_a_nul_byte_in_a_path_is_a_one_line_error(
    write_config: Callable[..., Path], overrides: dict, key: str
) -> None:
    path = write_config(overrides)
    result = _cli("status", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{key}: " in result.stderr and "NUL byte" in result.stderr, result.stderr


def test_a_state_that_is_a_regular_file_is_a_one_line_error(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "state").write_text("not a folder")
    path = write_config()
    for command in ("status", "run"):
        result = _cli(command, "--config", str(path))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "paths.state" in result.stderr and "is not a folder" in result.stderr
    assert (tmp_path / "state").read_text() == "not a folder"


def test_an_unwritable_log_file_is_a_one_line_error(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "logdir").mkdir()  # a folder where the log file should be: never writable
    path = write_config({"logging": {"file": "../logdir"}})
    result = _cli("run", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "logging.file" in result.stderr and "cannot be written" in result.stderr
    assert not (tmp_path / "state" / "journal.sqlite").exists()
