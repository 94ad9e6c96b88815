"""Does a version learn the new batch without forgetting? The seed articles' case, measured on
`builtin:shapes-sd` with its judge (a first cut: no prior preservation yet, see issue 16).

    .venv/bin/python bench/learning.py [--images-a 50] [--images-b 30]

Runs are real training children started as the daemon starts them (`daemon.child.Child`) on
`daemon/config.example-shapes.yaml`'s settings, each version's samples judged per concept:
1. v1 from `--images-a` images of concept A, the word `zorb` (a star the base never saw);
2. v2 from `--images-b` images of its variant, the hollow zorb, trained incrementally from v1
   (learning rate x incremental_lr_factor, <= incremental_epochs, rehearsal as configured);
3. the same data from scratch in one run, in a state of its own (the "full retrain");
4. a poisoned batch (circles and squares captioned as zorbs) after v2: the gate should hold it.
Printed per version: the judge's share of samples showing A, the variant and the base's own
shapes; each run's seconds (its child's `run timings`, samples excluded); the issue's ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

from lora_service import world  # noqa: E402
from lora_service.config import Config, load_config  # noqa: E402
from lora_service.daemon.child import Child  # noqa: E402
from lora_service.daemon.plan import plan_run  # noqa: E402
from lora_service.inbox.intake import Intake  # noqa: E402
from lora_service.journal import Journal, queries  # noqa: E402
from lora_service.logs import log_file  # noqa: E402
from lora_service.training.timing import logged  # noqa: E402

COLOURS = ("red", "blue", "green", "orange")
BACKGROUNDS = ("white", "gray", "black")


def prompts() -> list[str]:
    """Per concept, four prompts of different colours and backgrounds."""
    out = []
    for shape, hollow in (("zorb", False), ("zorb", True), ("circle", False), ("square", False),
                          ("triangle", False)):
        for i, colour in enumerate(COLOURS):
            out.append(world.Scene(shape, colour, BACKGROUNDS[i % 3], hollow=hollow).caption)
    return out


def write_config(root: Path, name: str) -> Config:
    data = yaml.safe_load((ROOT / "daemon" / "config.example-shapes.yaml").read_text())
    data["paths"] = {"inbox": "../inbox", "state": "../state"}
    data["samples"].update({"prompts": prompts(), "seeds": [0, 1]})
    data["logging"] = {"tensorboard": False}
    path = root / name / "conf" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def accept(config: Config, name: str, scenes: list[world.Scene],
           captions: list[str] | None = None) -> str:
    """Drop the scenes into the inbox (`captions` replacing theirs) and take them in as the
    daemon does (`Intake.scan`); the batch id."""
    folder = config.paths.inbox / name
    world.write_batch(folder, scenes)
    for i, caption in enumerate(captions or []):
        (folder / f"{i:04d}.txt").write_text(caption + "\n")
    (folder / config.inbox.ready_marker).touch()
    with Journal.for_state(config.paths.state) as journal:
        outcome = Intake(journal, config).scan(now=1e12)[0]
    assert outcome.batch_id is not None, outcome
    return outcome.batch_id


def register_base(config: Config) -> None:
    from lora_service.models import base_model  # the torch side: a bench may use both

    with Journal.for_state(config.paths.state) as journal:
        base_model.register(journal, base_model.materialise(config.base_model,
                                                            config.paths.state))


def train(config: Config, fresh: bool) -> dict[str, Any]:
    """One run as the daemon makes it; the resulting version's row, judge and seconds."""
    state = config.paths.state
    with Journal.for_state(state) as journal:
        run = plan_run(journal, config, fresh=fresh)
        assert run is not None
        journal.append(run)
    with contextlib.redirect_stderr(io.StringIO()):
        child = Child.start(config, run.run_id, state / "bench.heartbeat")
        code = child.proc.wait()
    if code != 0:
        sys.exit(f"bench: training child failed ({code}):\n{child.stderr_tail()}")
    with Journal.for_state(state, mode="read") as journal:
        version = queries.run(journal, run.run_id)["version"]
        row = next(r for r in queries.versions(journal) if r["version"] == version)
        judged = queries.judged(journal).get(version, {})
        head = queries.head_version(journal)
    seconds = logged(log_file(config), run.run_id)
    return {"version": version, "judge": judged, "held": bool(row["held"]),
            "reason": row["held_reason"], "head": head, "steps": row["steps"],
            "seconds": seconds["total"] - seconds.get("samples", 0.0)}


def shows(result: dict[str, Any], concept: str) -> float:
    return float(result["judge"].get(concept, {}).get("shows", float("nan")))


def base_shows(result: dict[str, Any]) -> float:
    return sum(shows(result, c) for c in ("circle", "square", "triangle")) / 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images-a", type=int, default=50)
    parser.add_argument("--images-b", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        root = Path(tmp)
        inc, full = write_config(root, "incremental"), write_config(root, "full")
        a = world.scenes(args.images_a, 100, shapes=("zorb",))
        b = world.scenes(args.images_b, 200, shapes=("zorb",), hollow=True)
        for config in (inc, full):
            register_base(config)
        accept(inc, "zorbs", a)
        v1 = train(inc, fresh=False)
        accept(inc, "hollow-zorbs", b)
        v2 = train(inc, fresh=False)
        accept(full, "zorbs", a)
        accept(full, "hollow-zorbs", b)
        retrain = train(full, fresh=False)
        others = world.scenes(20, 300, shapes=("circle", "square"))
        poison = accept(inc, "poison", others,
                        captions=[s.caption.replace(s.shape, "zorb") for s in others])
        v3 = train(inc, fresh=False)
    # the base, as the judge sees it: pretrain.py's report (every base prompt drew its shape)
    print(f"\nbuiltin:shapes-sd, {args.images_a} images of A (zorb), {args.images_b} of its "
          "variant (hollow zorb); judge share of samples showing each concept (8 per concept)")
    print(f"{'version':<22} {'A':>6} {'variant':>8} {'base shapes':>12} {'steps':>6} "
          f"{'seconds':>8}")
    for name, r in (("v1 (A)", v1), ("v2 (variant, incr.)", v2), ("full retrain", retrain),
                    ("v3 (poisoned)", v3)):
        print(f"{name:<22} {shows(r, 'zorb'):6.2f} {shows(r, 'hollow zorb'):8.2f} "
              f"{base_shows(r):12.2f} {r['steps']:6d} {r['seconds']:8.1f}")
    print(f"\nA after v1 >= 0.8: {shows(v1, 'zorb'):.2f}; variant after v2 >= 0.8: "
          f"{shows(v2, 'hollow zorb'):.2f}; A after v2 / after v1 >= 0.95: "
          f"{shows(v2, 'zorb') / max(shows(v1, 'zorb'), 1e-9):.2f}")
    print(f"incremental v2 vs full retrain: A {shows(v2, 'zorb') - shows(retrain, 'zorb'):+.2f}, "
          f"variant {shows(v2, 'hollow zorb') - shows(retrain, 'hollow zorb'):+.2f} (goal within "
          f"0.05), in {v2['seconds'] / retrain['seconds']:.2f} x its seconds (goal <= 0.5)")
    print(f"poisoned batch {poison}: {v3['version']} "
          + (f"held ({v3['reason']})" if v3["held"] else f"NOT held (head {v3['head']})"))


if __name__ == "__main__":
    main()
