"""Planning is torch-free (the daemon imports it) and the validation split is fixed forever."""

from __future__ import annotations

import subprocess
import sys

from lora_service.daemon.split import validation_count, validation_set

from .conftest import ROOT


def test_daemon_side_modules_do_not_import_torch():
    """At run time too (import-linter checks the source): the whole torch-free side loads."""
    code = ("import sys, pkgutil, importlib, lora_service\n"
            "for pkg in ('cli', 'daemon', 'inbox', 'journal', 'versions'):\n"
            "    for m in pkgutil.walk_packages([f'lora_service/{pkg}'], f'lora_service.{pkg}.'):\n"
            "        importlib.import_module(m.name)\n"
            "print(sorted(k for k in ('torch', 'diffusers', 'peft', 'transformers', 'open_clip')"
            " if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_validation_split_is_a_fixed_rule_on_hashes():
    shas = [f"{i:064x}" for i in range(8)]
    held = validation_set(shas, 0.1)
    assert len(held) == 1 and held == validation_set(reversed(shas), 0.1)
    assert validation_count(1, 0.5) == 0  # a lone image always trains
    assert validation_count(2, 0.9) == 1  # at least one image always trains
    assert validation_count(8, 0.0) == 0
    # pinned: the rule may never change, or old versions' validation losses stop comparing
    assert validation_set(shas, 0.25) == {f"{1:064x}", f"{6:064x}"}


def test_incremental_runs_use_the_lr_factor_fewer_epochs_and_continue_the_step():
    """The seeds' rule, without a training run: a first run at the configured rate and epochs
    from step 0; an increment at `learning_rate × incremental_lr_factor`, at most
    `incremental_epochs`, from its parent's global step."""
    from lora_service.config import Train
    from lora_service.daemon.plan import learning_schedule

    t = Train(learning_rate=1e-4, incremental_lr_factor=0.4, epochs=10, incremental_epochs=3)
    assert learning_schedule(t, None) == (1e-4, 10, 0)
    lr, epochs, start = learning_schedule(t, 120)
    assert lr == 1e-4 * 0.4 and epochs == 3 and start == 120
    few = Train(learning_rate=2e-4, incremental_lr_factor=0.5, epochs=2, incremental_epochs=5)
    assert learning_schedule(few, 8) == (1e-4, 2, 8)  # never more epochs than a first run
