"""The CLI contract: exit codes, one-line errors, --json output that parses."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from lora_service.cli import cli
from lora_service.journal import Journal
from lora_service.journal import events as ev


def lora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lora_service", *args],
                          capture_output=True, text=True, timeout=120)


def test_events_json_lines_and_since(write_config: Callable[..., Path], tmp_path: Path) -> None:
    config = write_config()
    with Journal.for_state(tmp_path / "state") as journal:
        journal.append(*(ev.BatchDetected(name=f"b{i}") for i in range(4)))
    result = CliRunner().invoke(cli, ["events", "--json", "--since", "2", "--config", str(config)],
                                catch_exceptions=False)
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [e["seq"] for e in lines] == [3, 4]
    assert lines[0]["type"] == "BatchDetected" and lines[0]["payload"]["name"] == "b2"
    assert set(lines[0]) == {"seq", "ts", "type", "schema", "payload", "prev_hash", "hash"}


def test_events_follow_streams_new_events(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config()
    with Journal.for_state(tmp_path / "state") as journal:
        journal.append(ev.BatchDetected(name="first"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_service", "events", "--follow", "--json", "--config",
         str(config)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["payload"]["name"] == "first"
        with Journal.for_state(tmp_path / "state") as journal:
            journal.append(ev.BatchDetected(name="second"))
        assert json.loads(proc.stdout.readline())["payload"]["name"] == "second"
    finally:
        proc.kill()
        proc.wait()


def test_verify_cli_exits_1_naming_the_tampered_seq(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config()
    state = tmp_path / "state"
    with Journal.for_state(state) as journal:
        journal.append(*(ev.BatchDetected(name=f"b{i}") for i in range(3)))
    ok = lora("verify", "--config", str(config))
    assert ok.returncode == 0 and ok.stdout.strip() == "ok: 3 events, 0 files checked"
    raw = sqlite3.connect(state / "journal.sqlite")
    raw.execute("DROP TRIGGER events_no_update")
    raw.execute("UPDATE events SET ts = replace(ts, '.', ',') WHERE seq = 2")
    raw.commit()
    raw.close()
    bad = lora("verify", "--json", "--config", str(config))
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert report["problems"][0] == (
        "schema: trigger events_no_update is missing (raw SQL can change events)")
    assert report["problems"][1] == "event seq 2 (BatchDetected): hash mismatch (event changed)"
    assert all("2" in p for p in report["problems"][2:])


def test_status_json_fields(write_config: Callable[..., Path], tmp_path: Path) -> None:
    Journal.for_state(tmp_path / "state").close()  # what the daemon's first start leaves
    result = CliRunner().invoke(cli, ["status", "--json", "--config", str(write_config())],
                                catch_exceptions=False)
    info = json.loads(result.output)
    assert {"head", "running", "pending", "next_run", "journal", "daemon", "last_failure"} <= set(
        info)
    assert info["journal"]["seq"] == 0 and info["daemon"]["running"] is False


def test_bad_usage_exits_2_in_one_line(write_config: Callable[..., Path], tmp_path: Path) -> None:
    config = str(write_config())
    Journal.for_state(tmp_path / "state").close()
    out = tmp_path / "x.png"
    result = lora("sample", "v0009", "--prompt", "x", "-o", str(out), "--config", config)
    assert result.returncode == 2 and "v0009" in result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()
    usage = lora("rollback", "--config", config)
    assert usage.returncode == 2
    assert "Missing argument" in usage.stderr and "Traceback" not in usage.stderr
    unknown = lora("nonsense")
    assert unknown.returncode == 2 and "No such command" in unknown.stderr


def test_status_shows_the_running_step_between_checkpoints(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config()
    with Journal.for_state(tmp_path / "state") as journal:
        journal.append(
            ev.RunStarted(run_id="r0001", parent=None, fresh=True, batches=("b",),
                          base_sha256="x", start_step=0, total_steps=40, learning_rate=1e-4,
                          epochs=1, seed=0, threads=1, config={"train": {"batch_size": 4}}),
            ev.LossLogged(run_id="r0001", step=15, loss=0.5, lr=1e-4, images_per_s=10.0),
        )
    result = CliRunner().invoke(cli, ["status", "--json", "--config", str(config)],
                                catch_exceptions=False)
    running = json.loads(result.output)["running"]
    assert running["step"] == 15 and running["progress"] == "15/40"
    assert running["eta_seconds"] == 10.0  # 25 steps x 4 images at 10 images/s
