"""Sample rendering time as a share of a run's training time, on the embedded default config.

Run: .venv/bin/python bench/samples.py [--images 8]

One first run on `daemon/config.yaml` (the embedded tiny SD, its train and samples settings;
only the paths point at a temporary folder): a batch of captioned 64 px images goes through
the real intake, the run is planned and executed in this process (`training.run.execute`, what
the child does), then `render_samples` renders the version's samples twice: as the child's hook
does (trained UNet, text encoder, VAE, tokenizer and scheduler already in memory) — the ratio
whose goal is <= 0.10 — and cold, loading base model and adapter from the state folder. All
are measured in this run.

Printed: render seconds / training-loop seconds (mean step time x steps) and / whole-run
seconds (base model load, latent caching, training, validation, publishing), with the
absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lora_service.config import parse_config  # noqa: E402
from lora_service.inbox.intake import Intake  # noqa: E402
from lora_service.journal import Journal  # noqa: E402


def make_batch(folder: Path, count: int, size: int = 64) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(4, size // 3)
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"a drawing of shape {i % 3}")
    (folder / "READY").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()

    import lora_service.models.torch_compat  # noqa: F401

    # isort: split
    from lora_service.daemon.plan import plan_run
    from lora_service.models import base_model
    from lora_service.models.render import Renderer, render_samples
    from lora_service.training.run import execute

    data = yaml.safe_load((ROOT / "daemon" / "config.yaml").read_text())
    data["paths"] = {"inbox": "inbox", "state": "state"}
    data.setdefault("logging", {})["tensorboard"] = False

    with tempfile.TemporaryDirectory(prefix="bench-samples-") as tmp:
        root = Path(tmp)
        config = parse_config(data, root / "config.yaml")
        make_batch(config.paths.inbox / "shapes", args.images)
        with Journal.for_state(config.paths.state) as journal:
            outcomes = Intake(journal, config).scan()
            assert [o.status for o in outcomes] == ["accepted"], outcomes
            base = base_model.materialise(config.base_model, config.paths.state)
            base_model.register(journal, base)
            run = plan_run(journal, config, base_sha256=base.sha256)
            assert run is not None
            journal.append(run)

            start = time.perf_counter()
            outcome = execute(config, journal, run.run_id)
            run_s = time.perf_counter() - start
            assert outcome.version is not None, outcome
            loop_s = _loop_seconds(journal, run.run_id, run.total_steps)

            # 1. as the training child's hook: every module already in memory (loaded here,
            # untimed), so only rendering, the PNGs and the journal append are timed
            pipe = Renderer(journal, config, outcome.version).pipe
            start = time.perf_counter()
            event = render_samples(
                journal,
                config,
                outcome.version,
                unet=pipe.unet,
                text_encoder=pipe.text_encoder,
                vae=pipe.vae,
                tokenizer=pipe.tokenizer,
                scheduler=pipe.scheduler,
                force=True,  # the child may have rendered already, once run.py has the hook
            )
            child_s = time.perf_counter() - start
            assert event is not None and event.error is None, event
            # 2. cold, from the version folder (what `compare` pays for a version with no
            # stored samples): base model and adapter loaded and verified first
            start = time.perf_counter()
            event = render_samples(journal, config, outcome.version, force=True)
            cold_s = time.perf_counter() - start
            assert event is not None and event.error is None, event

    s = config.samples
    print(
        f"samples: {len(s.prompts) * len(s.seeds)} images ({len(s.prompts)} prompts x "
        f"{len(s.seeds)} seeds, {s.steps} steps, {s.size}px): {child_s:.2f} s in the child, "
        f"{cold_s:.2f} s cold from the version folder; run: {run.total_steps} steps on "
        f"{args.images} images, training loop {loop_s:.2f} s, whole run {run_s:.2f} s"
    )
    print(
        f"ratio render/training-loop = {child_s / loop_s:.3f} (goal <= 0.10), "
        f"render/whole-run = {child_s / run_s:.3f}; "
        f"cold: {cold_s / loop_s:.3f} of the loop, {cold_s / run_s:.3f} of the run"
    )


def _loop_seconds(journal: Journal, run_id: str, steps: int) -> float:
    """The training loop's time: the mean seconds per step between the first and the last
    `LossLogged` of the run (journal timestamps; checkpoint saves included) x the run's steps."""
    from datetime import datetime

    points = [
        (e.payload["step"], datetime.fromisoformat(e.ts.replace("Z", "+00:00")))
        for e in journal.events(types=("LossLogged",))
        if e.payload["run_id"] == run_id
    ]
    (first_step, first_ts), (last_step, last_ts) = points[0], points[-1]
    if last_step == first_step:
        raise SystemExit("too few LossLogged points to time the loop with")
    per_step = (last_ts - first_ts).total_seconds() / (last_step - first_step)
    return per_step * steps


if __name__ == "__main__":
    main()
