"""The systemd unit is valid and hardened (exposure <= 2.0), checked offline by systemd-analyze."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "lora-service.service"
pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointed at this venv's real executable."""
    executable = Path(sys.executable).with_name("lora-service")
    text = UNIT.read_text().replace("/opt/lora-service/.venv/bin/lora-service", str(executable))
    path = tmp_path / "lora-service.service"
    path.write_text(text)
    return path


def test_unit_verifies(unit: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "lora-service" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_unit_exposure_is_at_most_2(unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-1000:]
    assert float(match.group(1)) <= 2.0


def test_unit_has_what_the_design_requires() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "Restart=on-failure", "OOMPolicy=continue", "WatchdogSec=",
                 "StateDirectory=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "PrivateTmp=yes", "PrivateNetwork=yes", "UMask=0077",
                 "SystemCallFilter=@system-service", "CapabilityBoundingSet=\n"):
        assert line in text, line
