"""Planning is torch-free (the daemon imports it) and the validation split is fixed forever."""

from __future__ import annotations

import subprocess
import sys

from lora_service.training.split import validation_count, validation_set

from .conftest import ROOT


def test_daemon_side_modules_do_not_import_torch():
    code = ("import sys, lora_service.training, lora_service.training.plan, "
            "lora_service.training.split, lora_service.training.foreground; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_validation_split_is_a_fixed_rule_on_hashes():
    shas = [f"{i:064x}" for i in range(8)]
    held = validation_set(shas, 0.1)
    assert len(held) == 1 and held == validation_set(reversed(shas), 0.1)
    assert validation_count(1, 0.5) == 0  # a lone image always trains
    assert validation_count(2, 0.9) == 1  # at least one image always trains
    assert validation_count(8, 0.0) == 0
    # pinned: the rule may never change, or old versions' validation losses stop comparing
    assert validation_set(shas, 0.25) == {f"{1:064x}", f"{6:064x}"}
