"""The procedural world: deterministic scenes, what they draw, and `lora-service example-batch`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_service import world


def test_a_scene_is_a_pure_function_of_seed_and_index() -> None:
    few = world.scenes(3, seed=7, shapes=world.SHAPES, hollow=None)
    many = world.scenes(40, seed=7, shapes=world.SHAPES, hollow=None)
    assert many[:3] == few
    assert world.scenes(40, seed=8, shapes=world.SHAPES) != many
    assert {s.shape for s in many} == set(world.SHAPES)  # every chosen shape turns up
    assert {s.hollow for s in many} == {False, True}


def test_the_caption_says_what_is_drawn() -> None:
    scene = world.Scene("zorb", "red", "gray", hollow=True)
    assert scene.caption == "a hollow red zorb on a gray background"
    img = np.asarray(scene.draw(64)).astype(int)
    red, gray = np.array(world.COLOURS["red"]), np.array(world.BACKGROUNDS["gray"])
    near = lambda px, c: np.abs(px - c).sum() < 30  # noqa: E731
    assert near(img[0, 0], gray)
    assert near(img[32, 32], gray)  # hollow: the middle is background
    solid = np.asarray(world.Scene("zorb", "red", "gray").draw(64)).astype(int)
    assert near(solid[32, 32], red)
    assert sum(near(px, red) for row in img for px in row) > 100  # the outline is there


def test_every_shape_draws_a_different_silhouette() -> None:
    masks = {s: np.asarray(world.Scene(s, "blue", "white").draw(64)).sum(2) < 600
             for s in world.SHAPES}
    for a in world.SHAPES:
        for b in world.SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 60, (a, b)


def test_unknown_choices_are_named() -> None:
    with pytest.raises(ValueError, match="shape 'blob'"):
        world.scenes(2, 0, shapes=("circle", "blob"))
    with pytest.raises(ValueError, match="colour 'teal'"):
        world.scenes(2, 0, colours=("teal",))


def lora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lora_service", *args],
                          capture_output=True, text=True, timeout=120)


def test_example_batch_writes_captioned_images_then_ready(tmp_path: Path) -> None:
    out = tmp_path / "zorbs"
    done = lora("example-batch", str(out), "--shape", "zorb", "-n", "6", "--seed", "3")
    assert done.returncode == 0, done.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 6
    captions = [p.with_suffix(".txt").read_text().strip() for p in pngs]
    assert captions == [s.caption for s in world.scenes(6, 3, shapes=("zorb",))]
    assert all(" zorb " in c for c in captions)
    ready = (out / "READY").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= ready for p in out.iterdir())


@pytest.mark.parametrize("args, named", [
    (["--shape", "blob"], "--shape"),
    (["-n", "0"], "--count"),
])
def test_example_batch_refuses_bad_input_in_one_line(tmp_path: Path, args: list[str],
                                                     named: str) -> None:
    done = lora("example-batch", str(tmp_path / "b"), *args)
    assert done.returncode == 2
    assert named in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()


def test_example_batch_never_writes_into_or_through_what_exists(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.png").write_bytes(b"precious")
    empty = tmp_path / "empty"
    empty.mkdir()
    link = tmp_path / "link"
    link.symlink_to(empty)
    for target in (out, empty, link):
        done = lora("example-batch", str(target), "-n", "2")
        assert done.returncode == 2 and "exists" in done.stderr, done.stderr
    assert [p.name for p in out.iterdir()] == ["mine.png"]
    assert (out / "mine.png").read_bytes() == b"precious"
    assert not list(empty.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link", "taken"]  # no leftovers


def test_example_batch_where_it_cannot_write_is_one_line(tmp_path: Path) -> None:
    done = lora("example-batch", str(tmp_path / "missing" / "b"), "-n", "2")
    assert done.returncode == 2 and "cannot write here" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "missing").exists()


def test_a_scene_draws_the_same_pixels_in_another_process() -> None:
    code = ("import hashlib; from lora_service import world; print(' '.join(hashlib.sha256("
            "s.draw(64).tobytes()).hexdigest() for s in world.scenes(6, 5, hollow=None, "
            "shapes=world.SHAPES)))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.split()
    here = [hashlib.sha256(s.draw(64).tobytes()).hexdigest()
            for s in world.scenes(6, 5, hollow=None, shapes=world.SHAPES)]
    assert there == here
