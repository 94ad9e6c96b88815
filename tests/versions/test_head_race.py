"""Two processes race decisions on the head: one publishes versions (the gate promotes a version
whose parent is still the head, else holds it), the other moves the head by hand in a tight
loop. Both decide on the head they read and append with that position (`journal.Expect`), so
the journal must always read as one serial order of the two: every `HeadMoved.previous` is the
head just before it, every promotion's parent is the head just before it, every hold for a
moved head names the head it saw, and the projection's head is where replaying leaves it.

Without `Expect` (the code before it) the mover's rollback and the publisher's promotion both
win: one of them names a `previous` that is no longer the head.

Run as a script, this file is one of the two racers:
    python test_head_race.py publish CONFIG COUNT       (prints a JSON line of counts)
    python test_head_race.py move CONFIG STOP_FILE      (moves until STOP_FILE exists)
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lora_service.config import load_config
from lora_service.journal import Journal, StaleDecision, StoredEvent, queries
from lora_service.store import sha256_file

ROOT = Path(__file__).resolve().parents[2]
PUBLISHES = 24  # versions the publisher makes; each one races the mover's moves
MOVER_LIMIT_S = 120.0  # the mover stops by itself if the test dies without a stop file


class CountingJournal(Journal):
    """A journal that counts the decisions it refused as stale (test instrumentation only)."""

    stale = 0

    def append(self, *events: Any, **kwargs: Any) -> list[int]:
        try:
            return super().append(*events, **kwargs)
        except StaleDecision:
            self.stale += 1
            raise


# -- the two racers (child processes) --------------------------------------------------------


def publisher(config_path: str, count: int) -> dict[str, int]:
    """Plan a run from the head as read (its parent), publish it; `count` times. One tiny UNet
    with a LoRA, built once, is every run's trained adapter."""
    import torch

    from tests.versions.conftest import (
        UNET_TARGETS,
        _publish_kwargs,
        _start_run,
        add_lora,
        publish_version,
    )

    torch.set_num_threads(1)
    from lora_service.models.base_model import build_tiny_sd

    unet = add_lora(build_tiny_sd().unet, rank=4, alpha=8.0, targets=UNET_TARGETS, seed=1)
    config = load_config(Path(config_path))
    journal = CountingJournal.for_state(config.paths.state, mode="write")
    for i in range(count):
        run_id = f"r{i:03d}"
        _start_run(journal, config, run_id, queries.head_version(journal))
        publish_version(journal, config, run_id=run_id, unet=unet, **_publish_kwargs())
    return {"published": count, "stale": journal.stale}


def mover(config_path: str, stop: str) -> dict[str, int]:
    """Move the head by hand to another of the three newest versions, as fast as it can, until
    `stop` exists (and there are at least two versions to move between)."""
    from lora_service.errors import UsageError
    from lora_service.versions.heads import move_head

    config = load_config(Path(config_path))
    journal = CountingJournal.for_state(config.paths.state, mode="write")
    rng = random.Random(1)
    moves = refused = 0
    deadline = time.monotonic() + MOVER_LIMIT_S
    while not os.path.exists(stop) and time.monotonic() < deadline:
        current = queries.head_version(journal)
        choices = [v for v in queries.version_names(journal)[-3:] if v != current]
        if not choices or current is None:
            time.sleep(0.002)
            continue
        target = rng.choice(choices)
        by = "rollback" if target < current else "promote"
        try:
            move_head(journal, config, target, reason=f"race move {moves}", by=by)
            moves += 1
        except UsageError:  # it became the head between our read and our decision
            refused += 1
    return {"moves": moves, "refused": refused, "stale": journal.stale}


# -- checking the journal --------------------------------------------------------------------


def check(stored: Iterable[StoredEvent]) -> tuple[str | None, list[str], dict[str, int]]:
    """Replay the head in seq order: (final head, violations, counts). A violation is a
    decision the journal shows was made on a head that was no longer the head."""
    head: str | None = None
    parent_of: dict[str, str | None] = {}
    planned_at: dict[str, int] = {}  # run_id -> seq of its RunStarted
    bad: list[str] = []
    counts = dict.fromkeys(("promotion", "rollback", "promote", "held", "moved_while_run"), 0)
    moves_seen = 0  # hand moves so far, to count runs that a move overtook
    for event in stored:
        p = event.payload
        if event.type == "RunStarted":
            planned_at[p["run_id"]] = moves_seen
        elif event.type == "VersionCreated":
            parent_of[p["version"]] = p["parent"]
            if moves_seen != planned_at.get(p["run_id"], moves_seen):
                counts["moved_while_run"] += 1
        elif event.type == "HeadMoved":
            counts[p["by"]] += 1
            if p["previous"] != head:
                bad.append(f"seq {event.seq}: {p['by']} to {p['version']} names previous "
                           f"{p['previous']}, but the head was {head}")
            if p["by"] == "promotion" and parent_of.get(p["version"], "?") != head:
                bad.append(f"seq {event.seq}: promoted {p['version']} (parent "
                           f"{parent_of.get(p['version'])}) over head {head}")
            if p["by"] != "promotion":
                moves_seen += 1
            head = p["version"]
        elif event.type == "VersionHeld":
            counts["held"] += 1
            # promote is `always`: only a parent that is not the head holds a version
            if p["parent"] == head or f"moved to {head} " not in p["reason"]:
                bad.append(f"seq {event.seq}: held {p['version']} (parent {p['parent']}) "
                           f"while the head was {head}: {p['reason']}")
    return head, bad, counts


def race(
    config_path: Path, state: Path, script: Path, env: dict[str, str], count: int
) -> dict[str, Any]:
    """Run the two racers on `state` and return their counts and the journal's check."""
    stop = state.parent / "stop-the-mover"

    def command(*args: object) -> list[str]:
        return [sys.executable, str(script), *map(str, args)]

    publish = subprocess.Popen(command("publish", config_path, count), cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    move = subprocess.Popen(command("move", config_path, stop), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out_p, err_p = publish.communicate(timeout=300)
    finally:
        stop.touch()
        out_m, err_m = move.communicate(timeout=60)
    assert publish.returncode == 0, err_p[-3000:]
    assert move.returncode == 0, err_m[-3000:]
    journal = Journal.for_state(state, mode="read")
    head, bad, counts = check(journal.events())
    return {
        "publisher": json.loads(out_p.splitlines()[-1]),
        "mover": json.loads(out_m.splitlines()[-1]),
        "final_head": head,
        "projected_head": queries.head_version(journal),
        "violations": bad,
        "counts": counts,
    }


def test_a_rollback_racing_a_publish_never_both_win(
    write_config: Callable[..., Path],
) -> None:
    config_path = write_config({"train": {"promote": "always"},
                                "paths": {"deploy_dir": "../deploy"}})
    config = load_config(config_path)
    state = config.paths.state
    Journal.for_state(state)  # created before either racer opens it
    env = os.environ | {"PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}

    started = time.monotonic()
    result = race(config_path, state, Path(__file__), env, PUBLISHES)
    took = time.monotonic() - started
    print(json.dumps(result | {"seconds": round(took, 1)}))

    assert result["violations"] == []
    assert result["final_head"] == result["projected_head"] is not None
    counts, pub, mov = result["counts"], result["publisher"], result["mover"]
    assert counts["promotion"] + counts["held"] == pub["published"] == PUBLISHES
    assert counts["rollback"] + counts["promote"] == mov["moves"]
    # the race was real: decisions were refused as stale and re-decided, and hand moves landed
    # while runs trained
    assert pub["stale"] + mov["stale"] >= 3, result
    assert counts["moved_while_run"] >= 3 and counts["held"] >= 1, result
    assert mov["moves"] >= PUBLISHES, result
    with Journal.for_state(state, mode="read") as journal:
        assert len(queries.version_names(journal)) == PUBLISHES
        # every head change deployed, racing the others: the deployed file is the head's
        head = queries.head_version(journal)
        files = json.loads(queries.version(journal, head)["files"])  # type: ignore[index]
    deployed = config.paths.deploy_dir / f"{config.name}.safetensors"  # type: ignore[operator]
    assert sha256_file(deployed) == files[f"versions/{head}/{config.name}-{head}.safetensors"]


if __name__ == "__main__":
    role, config_arg, arg = sys.argv[1:4]
    counts = publisher(config_arg, int(arg)) if role == "publish" else mover(config_arg, arg)
    print(json.dumps(counts), flush=True)
