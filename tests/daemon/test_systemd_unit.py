"""The systemd unit is valid and hardened (exposure <= 2.0), checked offline by systemd-analyze."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_service.daemon import child, supervisor

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "lora-service.service"
needs_analyze = pytest.mark.skipif(
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


@needs_analyze
def test_unit_verifies(unit: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "lora-service" in line]
    assert result.returncode == 0 and not problems, result.stderr


@needs_analyze
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


def seconds(value: str) -> float:
    """A systemd time span as the unit writes it: '180', '90s', '3min', '2min 30s'."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, value
    return sum(float(n) * units[u] for n, u in parts)


def test_stop_timeout_leaves_room_for_the_daemons_own_shutdown() -> None:
    """systemd must not SIGKILL a daemon that is still inside its own stop sequence: finding
    the workers, the child's checkpoint (STOP_TIMEOUT_S), its stderr, intake, ServiceStopped."""
    found = re.search(r"^TimeoutStopSec=(.+)$", UNIT.read_text(), re.MULTILINE)
    assert found, "TimeoutStopSec must be set (the default 90 s is shorter than a checkpoint)"
    own = child.WORKERS_WAIT_S + supervisor.STOP_TIMEOUT_S + 2 + supervisor.INTAKE_JOIN_S
    assert seconds(found.group(1)) >= own + 30, (found.group(1), own)
