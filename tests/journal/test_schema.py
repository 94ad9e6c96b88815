"""`verify` reports a schema that no longer makes `events` append-only.

Dropping a trigger is raw SQL that leaves every event and hash as it was, so the chain check
alone passes; the next raw UPDATE or DELETE then goes through. `verify` names what is missing
or changed and exits 1.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_service.journal import Journal
from lora_service.journal import events as ev
from lora_service.journal.sqlite import SCHEMA_VERSION


def lora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lora_service", *args],
                          capture_output=True, text=True, timeout=120)


TRIGGERS = ["events_no_update", "events_no_delete", "events_append_only"]

CHANGES: dict[str, tuple[str, str]] = {  # raw SQL, the line verify prints
    **{f"drop {name}": (f"DROP TRIGGER {name}", f"schema: trigger {name} is missing (raw SQL "
                        "can change events)") for name in TRIGGERS},
    "weaken events_no_delete": (
        "DROP TRIGGER events_no_delete; CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
        "WHEN old.seq < 0 BEGIN SELECT RAISE(ABORT, 'no'); END",
        "schema: trigger events_no_delete is not the one lora-service creates"),
    "add a trigger": (
        "CREATE TRIGGER sneak AFTER INSERT ON events BEGIN DELETE FROM position; END",
        "schema: unexpected trigger 'sneak' on 'events'"),
    "schema version": ("PRAGMA user_version = 1",
                       f"schema: version 1, expected {SCHEMA_VERSION} (the daemon upgrades an "
                       "older journal when it starts)"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_verify_names_a_dropped_or_changed_trigger_and_the_schema_version(
    write_config: Callable[..., Path], tmp_path: Path, change: str
) -> None:
    config = str(write_config())
    with Journal.for_state(tmp_path / "state") as journal:
        journal.append(ev.BatchDetected(name="one"), ev.BatchDetected(name="two"))
    assert lora("verify", "--config", config).returncode == 0
    sql, line = CHANGES[change]
    raw = sqlite3.connect(tmp_path / "state" / "journal.sqlite")
    raw.executescript(sql)
    raw.close()
    result = lora("verify", "--config", config)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.splitlines() == [line, "FAILED: 1 problems: 2 events, 0 files checked"]
