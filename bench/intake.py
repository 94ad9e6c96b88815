"""Intake throughput against the floor it cannot beat: a plain copy + sha256 of the same files.

Run: .venv/bin/python bench/intake.py [--images 96] [--size 256] [--workers N]
Both are measured in this run on the same files (page cache warm for both: the files are read
once before timing). Intake also fully decodes every image, checks captions, fsyncs the store
and journals, so the ratio says what validation and durability cost on top of copying.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_service.config import parse_config  # noqa: E402
from lora_service.inbox.intake import Intake  # noqa: E402
from lora_service.journal import Journal  # noqa: E402


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    """Photo-like images (shapes over a gradient, a little noise), half PNG, half JPEG."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(size), rng.randrange(size)
            r = rng.randrange(4, size // 3)
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        noise = Image.effect_noise((size, size), 20).convert("RGB")
        image = Image.blend(image, noise, 0.15)
        fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        path = folder / f"img{i:04d}.{ext}"
        path.write_bytes(buf.getvalue())
        (folder / f"img{i:04d}.txt").write_text(f"a picture number {i}")
        paths.append(path)
    (folder / "READY").write_text("")
    return paths


def plain_copy(paths: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True)
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as fin, open(dest / path.name, "wb") as fout:
            while chunk := fin.read(1 << 20):
                digest.update(chunk)
                fout.write(chunk)


def time_intake(source: Path, root: Path, workers: int | None) -> tuple[float, int, int]:
    """Seconds for one `Intake.scan()` of a fresh copy of the batch into a fresh state."""
    config = parse_config(
        {"paths": {"inbox": "inbox", "state": "state"}, "inbox": {"min_image_side": 8}},
        root / "config.yaml",
    )
    shutil.copytree(source, config.paths.inbox / "batch")
    for path in (config.paths.inbox / "batch").iterdir():  # warm the page cache
        path.read_bytes()
    with Journal.for_state(config.paths.state) as journal:
        intake = Intake(journal, config, workers=workers)
        start = time.perf_counter()
        outcomes = intake.scan()
        seconds = time.perf_counter() - start
    assert [o.status for o in outcomes] == ["accepted"], outcomes
    return seconds, outcomes[0].images, intake.workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3, help="best of N for each side")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        root = Path(tmp)
        paths = make_images(root / "source", args.images, args.size)
        for path in paths:
            path.read_bytes()
        plain_s = intake_s = float("inf")
        for r in range(args.repeat):
            start = time.perf_counter()
            plain_copy(paths, root / f"plain{r}")
            plain_s = min(plain_s, time.perf_counter() - start)
            seconds, images, workers = time_intake(root / "source", root / f"run{r}",
                                                   args.workers)
            assert images == args.images
            intake_s = min(intake_s, seconds)

    intake_rate = args.images / intake_s
    plain_rate = args.images / plain_s
    print(
        f"intake: {intake_rate:.1f} img/s, plain copy+sha256: {plain_rate:.1f} img/s, "
        f"ratio X/Y = {intake_rate / plain_rate:.3f} "
        f"({args.images} images, {args.size}px, workers={workers}, best of {args.repeat})"
    )


if __name__ == "__main__":
    main()
