"""A newcomer's first version: from dropping 8 captioned images into the inbox to `v0001`, on
`daemon/config.yaml` from a fresh state, with where the time went (goal <= 15 s on 2 cores).

    .venv/bin/python bench/first_version.py [--batches 2]

Does what README's walkthrough does: starts `lora-service run` on a copy of daemon/config.yaml,
waits until it is idle (base model registered), makes the README's 8 images with sidecar
captions, copies the folder into the inbox and touches READY. The clock starts at READY; the
journal's timestamps and the training child's `run timings` log line say where the seconds
went. With `--batches 2` a second batch is dropped after the first version: an increment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from PIL import Image

from lora_service.journal import Journal
from lora_service.journal.sqlite import NoJournal
from lora_service.training.timing import logged

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300.0


def seconds(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def events(state: Path) -> list[tuple[str, float, dict]]:
    try:
        with Journal.for_state(state, mode="read") as journal:
            return [(e.type, seconds(e.ts), e.payload) for e in journal.events()]
    except NoJournal:  # not yet created
        return []


def wait_for(state: Path, type_: str, count: int, daemon: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if sum(1 for t, _, _ in events(state) if t == type_) >= count:
            return
        if daemon.poll() is not None:
            sys.exit(f"bench: the daemon exited ({daemon.returncode})")
        time.sleep(0.05)
    sys.exit(f"bench: no {type_} within {TIMEOUT_S:.0f} s")


def make_batch(folder: Path, name: str, shift: int) -> None:
    """README's walkthrough batch: 8 images of 64 px with `<stem>.txt` captions."""
    folder.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (64, 64), ((30 * i + shift) % 256, 100, 200 - 20 * i)).save(
            folder / f"{name}{i}.png")
        (folder / f"{name}{i}.txt").write_text(f"a photo of a {name}, style {i}")


def report(state: Path, dropped: float, version: str) -> float:
    """Print the drop -> version breakdown; return drop -> VersionCreated seconds."""
    seen = events(state)
    created = next(p for t, _, p in seen if t == "VersionCreated" and p["version"] == version)
    run_id = created["run_id"]

    def at(type_: str, **match: str) -> float:
        return next(ts for t, ts, p in seen
                    if t == type_ and all(p.get(k) == v for k, v in match.items()))

    batch = created["new_batches"][0]
    name = next(p["name"] for t, _, p in seen if t == "BatchAccepted" and p["batch_id"] == batch)
    marks = [
        ("detected (watch, READY)", at("BatchDetected", name=name)),
        ("accepted (checks, copy)", at("BatchAccepted", batch_id=batch)),
        ("run planned", at("RunStarted", run_id=run_id)),
        ("version created", at("VersionCreated", version=version)),
        ("samples rendered", at("SamplesRendered", version=version)),
    ]
    print(f"\n{version} (run {run_id}): drop -> version {marks[3][1] - dropped:.2f} s, "
          f"-> samples {marks[4][1] - dropped:.2f} s   (goal <= 15 s)")
    last = dropped
    for label, ts in marks:
        print(f"  {label:26s} +{ts - last:6.2f} s   (at {ts - dropped:6.2f} s)")
        last = ts
    child = logged(state / "logs" / "train.log", run_id)
    if child:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in child.items() if v >= 0.005 and k != "total")
        print(f"  training child (s): {shown}; total {child['total']:.2f}")
    return marks[3][1] - dropped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-first-") as tmp:
        root = Path(tmp)
        (root / "daemon").mkdir()
        shutil.copy(ROOT / "daemon" / "config.yaml", root / "daemon" / "config.yaml")
        inbox, state = root / "inbox", root / "state"
        inbox.mkdir()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lora_service", "run", "--config",
             str(root / "daemon" / "config.yaml")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(state, "ServiceStarted", 1, daemon)
            wait_for(state, "BaseModelRegistered", 1, daemon)
            time.sleep(1.0)  # idle in its loop
            for n in range(args.batches):
                name = ("cat", "dog", "fox", "owl")[n % 4]
                staging = root / "staging" / name
                make_batch(staging, name, 17 * n)
                shutil.copytree(staging, inbox / name)
                (inbox / name / "READY").touch()
                dropped = time.time()
                wait_for(state, "SamplesRendered", n + 1, daemon)
                report(state, dropped, f"v{n + 1:04d}")
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)


if __name__ == "__main__":
    main()
