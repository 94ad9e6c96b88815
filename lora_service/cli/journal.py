"""Commands that read the journal as a whole: `status`, `events`, `verify`."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from lora_service.cli.common import (
    config_option,
    echo,
    emit_json,
    emit_json_line,
    json_option,
    load,
    open_journal,
)
from lora_service.daemon.statusfile import read_status
from lora_service.errors import ServiceError
from lora_service.journal import Journal, queries
from lora_service.journal.sqlite import INT64
from lora_service.journal.verify import verify as run_verify
from lora_service.store import StateLock
from lora_service.versions import witness


def collect_status(journal: Journal, state_dir: Path) -> dict[str, Any]:
    head = queries.head(journal)
    run = queries.running_run(journal)
    running = None
    if run is not None:
        done = run["last_step"] - run["start_step"]
        running = {
            "run_id": run["run_id"],
            "step": run["last_step"],
            "start_step": run["start_step"],
            "total_steps": run["total_steps"],
            "progress": f"{done}/{run['total_steps']}",
            "parent": run["parent"],
        }
        rate = queries.images_per_s(journal, run["run_id"])
        if rate:
            batch = (queries.loads(run["config"]) or {}).get("train", {}).get("batch_size", 1)
            remaining = max(0, run["total_steps"] - done)
            running["eta_seconds"] = round(remaining * batch / rate, 1)
    failed = queries.last_failed_run(journal)
    held = queries.held_versions(journal)
    seq = journal.last_seq()
    last = next(journal.events(since=seq - 1), None) if seq else None
    projected = journal.projected_seq() or 0
    holder = StateLock(state_dir).holder()
    daemon = read_status(state_dir) if holder else None
    # verified: the head has a validation loss; without one no gate ever had evidence about it
    measured = queries.version(journal, head.version) if head else None
    return {
        "head": (
            {"version": head.version, "since": head.ts, "reason": head.reason,
             "moved_by": head.moved_by,
             "verified": bool(measured and measured["val_loss"] is not None),
             "imported": queries.imported(journal, head.version) is not None}
            if head
            else None
        ),
        "running": running,
        "pending": {
            "batches": queries.pending_batches(journal),
            "images": queries.pending_images(journal),
        },
        "held": [{"version": h.version, "reason": h.reason} for h in held],
        "last_failure": asdict(failed) if failed else None,
        "next_run": daemon.get("next_run") if daemon else None,
        "daemon": {"running": holder is not None, "pid": holder, **(daemon or {})},
        "journal": {"seq": seq, "hash": last.hash, "ts": last.ts} if last else
                   {"seq": 0, "hash": None, "ts": None},
        "problems": [] if projected == seq else [
            f"journal: events end at seq {seq} but the projections are at seq {projected} "
            "(rows written around the journal; `lora-service verify` says more)"
        ],
    }


@click.command()
@config_option
@json_option
def status(config_path: Path, as_json: bool) -> None:
    """Head, running run and its step, pending batches, next scheduled run, journal position."""
    config = load(config_path)
    with open_journal(config, "read") as journal:
        info = collect_status(journal, config.paths.state)
    if as_json:
        emit_json(info)
        if info["problems"]:
            raise ServiceError("; ".join(info["problems"]))
        return
    head = info["head"]
    echo(f"head:      {head['version']} ({head['reason']})" if head else "head:      none")
    if head and not head["verified"]:
        why = ("imported; not validated here" if head["imported"] else "no held-out image in "
               "what it learned: one-image batches or validation_split 0")
        echo(f"verified:  no, unverified: {head['version']} has no validation loss ({why})")
    run = info["running"]
    if run:
        eta = f", ETA {run['eta_seconds']:.0f}s" if run.get("eta_seconds") is not None else ""
        echo(f"running:   {run['run_id']} step {run['step']} ({run['progress']}){eta}")
    else:
        echo("running:   nothing")
    pending = info["pending"]
    echo(f"pending:   {len(pending['batches'])} batches, {pending['images']} images")
    for held in info["held"]:
        echo(f"held:      {held['version']}: {held['reason']}")
    failure = info["last_failure"]
    if failure:
        echo(f"failure:   {failure['run_id']}: {failure['last_error']}")
    daemon = info["daemon"]
    running = f"running (pid {daemon['pid']})" if daemon["running"] else "not running"
    echo(f"daemon:    {running}")
    if daemon["running"] and daemon.get("problem"):
        echo(f"problem:   {daemon['problem']}")
    if info["next_run"]:
        echo(f"next run:  {info['next_run']}")
    position = info["journal"]
    echo(f"journal:   seq {position['seq']}")
    if info["problems"]:
        raise ServiceError("; ".join(info["problems"]))


def _line(stored: Any) -> str:
    payload = stored.payload
    brief = ", ".join(
        f"{k}={v}"
        for k, v in payload.items()
        if k not in ("files", "released", "config") and v not in (None, [], {}, "")
        and not isinstance(v, (list, dict))
    )
    return f"{stored.seq:>6}  {stored.ts}  {stored.type:<20} {brief}"


@click.command()
@config_option
@json_option
@click.option("--since", type=click.IntRange(min=0, max=INT64.stop - 1), default=0,
              metavar="SEQ", help="Only events after SEQ.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they come.")
def events(config_path: Path, as_json: bool, since: int, follow: bool) -> None:
    """The journal, oldest first; one JSON object a line with --json."""
    config = load(config_path)
    with open_journal(config, "read") as journal:
        position = since
        while True:
            for stored in journal.events(since=position):
                if as_json:
                    emit_json_line(stored.as_json())
                else:
                    echo(_line(stored))
                position = stored.seq
            if not follow:
                return
            time.sleep(0.3)


@click.command()
@config_option
@json_option
@click.option("--witness", "witness_flag", is_flag=True,
              help="Also check the journal position that the PATHs (files or folders) carry.")
@click.argument("paths", nargs=-1, metavar="[PATH]...",
                type=click.Path(exists=True, path_type=Path))
def verify(config_path: Path, as_json: bool, witness_flag: bool, paths: tuple[Path, ...]) -> None:
    """Check the schema's append-only triggers, the hash chain, projections against their
    rebuild, and every file's sha256.

    With --witness PATH...: published files (a version's kohya or peft .safetensors, its
    card.json; deployed and exported copies; folders are searched) carry the journal's seq and
    hash at publication; each must still be in the chain, so a journal tail rewritten with
    recomputed hashes, or cut off, fails here even though the chain itself is consistent."""
    if witness_flag != bool(paths):
        raise click.UsageError("--witness needs one or more PATHs (files or folders)"
                               if witness_flag else f"{paths[0]}: a PATH needs --witness")
    config = load(config_path)
    found = witness.find(paths) if paths else []
    with open_journal(config, "read") as journal:
        report = run_verify(journal, config.paths.state)
        for one in found:
            report.problems += witness.check(journal, one)
        report.witnesses = len(found)
    if as_json:
        emit_json({"ok": report.ok, "events": report.events, "files": report.files,
                   "witnesses": report.witnesses, "problems": report.problems})
    else:
        for problem in report.problems:
            echo(problem)
        verdict = "ok" if report.ok else f"FAILED: {len(report.problems)} problems"
        checked = f"{report.events} events, {report.files} files"
        checked += f", {report.witnesses} witnesses" if paths else ""
        echo(f"{verdict}: {checked} checked")
    if not report.ok:
        click.get_current_context().exit(1)


COMMANDS = [status, events, verify]
