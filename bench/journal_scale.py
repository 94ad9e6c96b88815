"""Read commands on a journal grown to a year of service: seconds and peak memory of each.

Run: .venv/bin/python bench/journal_scale.py [--events 1000000] [--fresh]
     [--python PY] [--pythonpath CODE]

1. A real state (conf/config.yaml + state/) is grown to N events through `Journal.append`, many
   events per transaction, by the code under test (so its own schema): a year of service as
   cycles of batch accepted, training requested, run started, a loss per step (most of the
   events), checkpoints (each releasing the previous one), a version created, its promotion,
   deploy and samples; now and then a held version, a failed and resumed run (which re-logs
   steps), a rollback, a service restart. The last cycle is cut where N is reached, so a run
   is training. Every file an event records is written (a few bytes), so `verify` passes.
   The state is cached under /tmp, keyed by N and by the sources of the code under test's
   journal and of this bench (`--fresh` grows it again).
2. Each command runs as `PY -m lora_service ... --config ...` with PYTHONPATH=CODE, from a
   neutral folder, so an older checkout can be measured (`--pythonpath /tmp/pre-scale`). Wall
   seconds, the peak RSS of its largest process (`os.wait4`) and of all its processes together
   (`verify` decodes in a second one; sampled from /proc) are printed, with the journal's size
   per event and verify's events per second, and the load average when it started (the
   machine is shared: a busy one slows every figure). No assert on time: goals are printed
   beside.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOSS_STEPS = 300  # logged steps per run: ~330 events a cycle, ~3,000 versions at 1M events
SAVE_STEPS = 100
IMAGES = 3  # per batch, each with a caption sidecar
CONFIG = {
    "train": {"resolution": 512, "batch_size": 2, "epochs": 5, "incremental_epochs": 3,
              "learning_rate": 1e-4, "save_steps": SAVE_STEPS, "validation_split": 0.1,
              "scheduler": "cosine", "warmup_steps": 10, "max_grad_norm": 1.0},
    "lora": {"rank": 16, "alpha": 16, "dropout": 0.0,
             "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]},
    "gate": {"tolerance": 0.05, "promote": "gate"},
}


# -- growing the state (runs under the code under test) ------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Year:
    """The events of a year of service, in order, with the files each one records."""

    def __init__(self, seed: int = 0) -> None:
        from lora_service.journal import events as ev

        self.ev = ev
        self.rng = random.Random(seed)
        self.files: dict[str, bytes] = {}  # written before the event that records them
        self.seq = 0
        self.base = _sha("base model")
        self.head: str | None = None
        self.parents: dict[str, str | None] = {}
        self.steps: dict[str | None, int] = {None: 0}
        self.batches: list[str] = []

    def _file(self, path: str) -> str:
        data = f"{path}\n".encode()
        self.files[path] = data
        return hashlib.sha256(data).hexdigest()

    def _emit(self, event: Any) -> Any:
        self.seq += 1
        return event

    def events(self) -> Iterator[Any]:
        ev = self.ev
        yield self._emit(ev.BaseModelRegistered(spec="builtin:tiny-sd", sha256=self.base,
                                                path="models/tiny-sd", kind="builtin"))
        for cycle in range(1, 10**9):
            if cycle % 40 == 1:
                if cycle > 1:
                    yield self._emit(ev.ServiceStopped(pid=1000 + cycle, reason="signal"))
                yield self._emit(ev.ServiceStarted(version="0.1.0", pid=1001 + cycle,
                                                   config_hash=_sha(str(cycle)),
                                                   config_path="/etc/lora/config.yaml",
                                                   hostname="trainer"))
            yield from self._cycle(cycle)

    def _cycle(self, i: int) -> Iterator[Any]:
        ev, rng = self.ev, self.rng
        name = f"drop-{i:05d}"
        batch_id = _sha(name)[:16]
        yield self._emit(ev.BatchDetected(name=name))
        images, files = [], {}
        for k in range(IMAGES):
            image, caption = f"img{k}.png", f"img{k}.txt"
            sha = self._file(f"batches/{batch_id}/{image}")
            files[f"batches/{batch_id}/{image}"] = sha
            files[f"batches/{batch_id}/{caption}"] = self._file(f"batches/{batch_id}/{caption}")
            images.append(ev.ImageRecord(file=image, sha256=sha, caption=f"a photo {i} {k}",
                                         caption_source="sidecar", width=512, height=512))
        yield self._emit(ev.BatchAccepted(name=name, batch_id=batch_id, images=tuple(images),
                                          moved_to=f".accepted/{name}", files=files))
        self.batches.append(batch_id)
        request = self.seq + 1
        yield self._emit(ev.TrainingRequested(reason="arrival"))
        run_id = f"run-{i:05d}"
        parent = self.head
        start = self.steps[parent]
        rehearsal = tuple(self.batches[-5:-1])
        yield self._emit(ev.RunStarted(
            run_id=run_id, parent=parent, fresh=parent is None, batches=(batch_id,),
            rehearsal=rehearsal, rehearsal_images=tuple(f"{b}/img0.png" for b in rehearsal),
            rehearsal_seed=i, images=IMAGES * (1 + len(rehearsal)), base_sha256=self.base,
            start_step=start, total_steps=LOSS_STEPS, request_seq=request, learning_rate=1e-4,
            epochs=5, seed=i, threads=4, config=CONFIG))
        fails_at = LOSS_STEPS // 2 + 7 if i % 25 == 0 else None
        checkpoint: str | None = None
        step, end = start + 1, start + LOSS_STEPS
        level = 0.08 + 0.05 * rng.random()
        while step <= end:
            k = step - start
            loss = level + 0.06 * math.exp(-k / 80) + rng.gauss(0, 0.006)
            if rng.random() < 1 / 4000:
                loss *= 6  # a spike
            lr = 1e-4 * (0.5 + 0.5 * math.cos(math.pi * k / LOSS_STEPS))
            yield self._emit(ev.LossLogged(run_id=run_id, step=step, loss=loss, lr=lr,
                                           images_per_s=round(rng.uniform(5.5, 6.5), 2)))
            if k % SAVE_STEPS == 0 or step == end:
                path = f"runs/{run_id}/checkpoints/step-{step:06d}"
                adapter = f"{path}/adapter_model.safetensors"
                released = (f"{checkpoint}/adapter_model.safetensors",) if checkpoint else ()
                yield self._emit(ev.CheckpointSaved(run_id=run_id, step=step, path=path,
                                                    files={adapter: self._file(adapter)},
                                                    released=released))
                checkpoint = path
            if fails_at is not None and k == fails_at:
                fails_at = None
                yield self._emit(ev.RunFailed(run_id=run_id, reason="child killed by SIGKILL",
                                              exit_code=-9, signal="SIGKILL"))
                yield self._emit(ev.RunResumed(run_id=run_id, from_step=start + SAVE_STEPS,
                                               checkpoint=checkpoint, reason="restart"))
                step = start + SAVE_STEPS  # the steps after the checkpoint are logged again
            step += 1
        version = f"v{i:04d}"
        folder = f"versions/{version}"
        vfiles = {f"{folder}/{rel}": self._file(f"{folder}/{rel}") for rel in (
            "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
            f"lora-{version}.safetensors", "card.json")}
        known = {b: round(level + rng.uniform(0, 0.02), 6) for b in self.batches[-8:]}
        val = round(sum(known.values()) / len(known), 6)
        yield self._emit(ev.VersionCreated(
            version=version, run_id=run_id, parent=parent, batches=(batch_id, *rehearsal),
            new_batches=(batch_id,), images=IMAGES, step=end, steps=LOSS_STEPS,
            train_loss=round(level, 6), val_loss=val, val_loss_per_batch=known,
            val_loss_known=val, base_sha256=self.base, files=vfiles,
            released=(f"{checkpoint}/adapter_model.safetensors",)))
        self.parents[version] = parent
        self.steps[version] = end
        if i % 20 == 0:
            yield self._emit(ev.VersionHeld(
                version=version, parent=parent, val_loss_known=val, parent_val_loss_known=val,
                tolerance=0.05, reason="validation loss on known batches rose",
                worse_batches=(rehearsal[:1])))
            return
        yield self._emit(ev.HeadMoved(version=version, previous=self.head,
                                      reason="gate passed", by="promotion"))
        self.head = version
        yield self._emit(ev.VersionExported(version=version, path="/srv/webui/lora.safetensors",
                                            sha256=vfiles[f"{folder}/lora-{version}.safetensors"]))
        yield self._emit(ev.SamplesRendered(version=version, prompts=("a photo", "a sketch"),
                                            seeds=(1, 2), seconds=12.5))
        if i % 60 == 30 and parent is not None:
            yield self._emit(ev.HeadMoved(version=parent, previous=version,
                                          reason="new batch was mislabelled", by="rollback"))
            self.head = parent
            yield self._emit(ev.VersionExported(version=parent, path="/srv/webui/lora.safetensors",
                                                sha256=_sha(parent)))


def grow(root: Path, events: int, chunk: int = 2000) -> None:
    """Write conf/config.yaml and grow state/ to `events` events (the code under test's API)."""
    from lora_service.journal import Journal

    (root / "conf").mkdir(parents=True)
    (root / "inbox").mkdir()
    (root / "conf" / "config.yaml").write_text(
        json.dumps({"paths": {"inbox": "../inbox", "state": "../state"}}))
    state = root / "state"
    year = Year()
    start = time.perf_counter()
    with Journal.for_state(state) as journal:
        pending: list[Any] = []
        for n, event in enumerate(year.events(), 1):
            pending.append(event)
            if len(pending) == chunk or n == events:
                for rel, data in year.files.items():  # files first, as the service writes
                    path = state / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                year.files.clear()
                journal.append(*pending)  # one transaction for the chunk
                pending.clear()
            if n == events:
                break
        assert journal.last_seq() == events
    seconds = time.perf_counter() - start
    print(f"grew {events:,} events in {seconds:.1f} s ({events / seconds:,.0f} events/s), "
          f"{len(year.steps) - 1:,} versions", flush=True)


# -- measuring (runs under any interpreter with this bench) --------------------------------


def code_key(code: Path, events: int) -> str:
    """What the grown state depends on: N, the code under test's journal writer (events,
    projections, SQLite store) and the events this bench writes."""
    digest = hashlib.sha256(str(events).encode())
    for name in ("events.py", "projections.py", "sqlite.py"):
        digest.update((code / "lora_service" / "journal" / name).read_bytes())
    digest.update((inspect.getsource(Year) + inspect.getsource(grow)).encode())
    return digest.hexdigest()[:12]


def cached_state(python: str, code: Path, events: int, fresh: bool) -> Path:
    root = Path(tempfile.gettempdir()) / f"lora-scale-{events}-{code_key(code, events)}"
    if root.exists() and not fresh:
        print(f"state: {root} (cached; --fresh grows it again)", flush=True)
        return root
    shutil.rmtree(root, ignore_errors=True)
    building = root.with_name(root.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    print(f"state: growing {root} ...", flush=True)
    subprocess.run([python, __file__, "--grow-into", str(building), "--events", str(events)],
                   env={**os.environ, "PYTHONPATH": str(code)}, cwd=tempfile.gettempdir(),
                   check=True)
    building.rename(root)
    return root


# Runs in a fresh, small interpreter per command: a process's peak RSS counts what it had before
# exec, so a command forked by this bench after it parsed a 190 MB JSON would report that.
HELPER = r"""
import json, os, subprocess, sys, threading, time
from pathlib import Path

def tree_rss_mb(pid):
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            todo += [int(c) for c in
                     Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total / 1024

out, err, command = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out, "wb") as stdout, open(err, "wb") as stderr:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=stdout, stderr=stderr)
    peak, done = [0.0], threading.Event()
    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
print(json.dumps({"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "tree_mb": peak[0],
                  "rc": os.waitstatus_to_exitcode(status)}))
"""


def measure(python: str, code: Path, root: Path, args: list[str]) -> dict[str, Any]:
    """One command in a fresh process, started by a fresh helper: wall seconds, peak RSS of
    its largest process (`wait4`) and of all its processes together (VmRSS summed over the
    process tree every 20 ms: shared pages count in each, so an upper bound), exit code and
    output."""
    out, err = root / "out.txt", root / "err.txt"
    command = [python, "-m", "lora_service", *args, "--config",
               str(root / "conf" / "config.yaml")]
    helper = subprocess.run(
        [sys.executable, "-c", HELPER, str(out), str(err), *command], cwd=root,
        env={**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(helper.stdout)
    return result | {"stdout": out.read_text(), "stderr": err.read_text().strip()}


def loss_note(result: dict[str, Any]) -> str:
    if result["rc"] != 0:
        return f"exit {result['rc']}: {result['stderr'][-200:]}"
    series = json.loads(result["stdout"])
    note = f"{len(series['points']):,} points, {len(result['stdout']) / 1e6:.1f} MB of JSON"
    sampled = series.get("downsampled")
    if sampled:
        note += f" (of {sampled['total_points']:,})"
    return note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--fresh", action="store_true", help="grow the state again")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the CLI")
    parser.add_argument("--pythonpath", type=Path, default=ROOT,
                        help="checkout whose lora_service is measured (default: this one)")
    parser.add_argument("--grow-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grow_into:
        grow(args.grow_into, args.events)
        return

    code = args.pythonpath.resolve()
    root = cached_state(args.python, code, args.events, args.fresh)
    state = root / "state"
    journal_bytes = sum(p.stat().st_size for p in state.glob("journal.sqlite*"))
    help_text = subprocess.run([args.python, "-m", "lora_service", "loss", "--help"],
                               capture_output=True, text=True, cwd=root,
                               env={**os.environ, "PYTHONPATH": str(code)}).stdout
    full = ["--full"] if "--full" in help_text else None

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows: list[tuple[str, dict[str, Any], str, str]] = []
    status = measure(args.python, code, root, ["status"])
    rows.append(("status", status, "", f"exit {status['rc']}"))
    versions = measure(args.python, code, root, ["versions", "--json"])
    count = len(json.loads(versions["stdout"])) if versions["rc"] == 0 else 0
    rows.append(("versions --json", versions, "", f"{count:,} versions"))
    loss = measure(args.python, code, root, ["loss", "--json"])
    rows.append(("loss --json", loss, "<= 1 s, <= 200 MB", loss_note(loss)))
    if full:
        whole = measure(args.python, code, root, ["loss", "--json", *full])
        rows.append(("loss --json --full", whole, "", loss_note(whole)))
    else:
        rows.append(("loss --json --full", {}, "", "no --full in this version (--json is full)"))
    verify = measure(args.python, code, root, ["verify"])
    rate = args.events / verify["seconds"]
    verdict = verify["stdout"].strip().splitlines()[-1] if verify["stdout"].strip() else ""
    rows.append(("verify", verify, "<= 300 MB, >= 100k events/s",
                 f"{rate:,.0f} events/s; {verdict}" + (f" (exit {verify['rc']})"
                                                       if verify["rc"] else "")))

    print(f"code: {code} ({args.python})")
    print(f"journal: {args.events:,} events, {journal_bytes / 1e6:.1f} MB "
          f"({journal_bytes / args.events:.0f} bytes/event)")
    print(f"load average before: {load}")
    print(f"{'command':<20} {'seconds':>8} {'peak RSS MB':>12} {'all procs MB':>13}  "
          f"{'goal':<28} notes")
    for name, result, goal, note in rows:
        if result:
            print(f"{name:<20} {result['seconds']:>8.2f} {result['rss_mb']:>12.0f} "
                  f"{result['tree_mb']:>13.0f}  {goal:<28} {note}")
        else:
            print(f"{name:<20} {'-':>8} {'-':>12} {'-':>13}  {goal:<28} {note}")


if __name__ == "__main__":
    main()
