"""The process boundary is enforced by import-linter (its contracts are in `.importlinter`),
and the contracts really bite: on a copy of the package with one forbidden import added, each
kind of breach (torch on the torch-free side, a torch-side module there, a cycle) fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_package_keeps_its_contracts() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("cli/common.py", "import torch", "never imports the torch side"),
    ("daemon/plan.py", "from lora_service.models import base_model", "never imports the torch"),
    ("versions/gate.py", "def _f():\n    import diffusers", "never imports the torch side"),
    ("journal/queries.py", "from lora_service.versions import gate", "folders are layers"),
    ("versions/verify.py", "from lora_service.versions import publish", "no import cycles"),
])
def test_a_breach_is_caught(tmp_path: Path, module: str, line: str, contract: str) -> None:
    shutil.copytree(ROOT / "lora_service", tmp_path / "lora_service",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    target = tmp_path / "lora_service" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in broken, result.stdout[-3000:]
