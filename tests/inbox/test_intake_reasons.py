"""One real bad file per reason, dropped beside good ones: the reason is journaled with the file
name, and the good files of the same batch are still accepted."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from lora_service.journal import events as ev

from .conftest import Env, drop, image_bytes, sha

GOOD = {"good1.png": image_bytes(1), "good1.txt": "a red square",
        "good2.jpg": image_bytes(2, fmt="JPEG"), "good2.txt": "a green square"}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width`x`height` but carries a few bytes of pixel data: decoding it
    would fail as truncated, so a size refusal proves the header was checked first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def apng(frames: int = 2) -> bytes:
    images = [Image.new("RGB", (32, 32), (i * 80, 0, 0)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="PNG", save_all=True, append_images=images[1:])
    return buf.getvalue()


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 200)).save(buf, format="GIF")
    return buf.getvalue()


def noisy(size: int = 48, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(buf, format=fmt)
    return buf.getvalue()


def symlink_outside(folder: Path) -> None:
    outside = folder.parent.parent / "outside.png"
    outside.write_bytes(image_bytes(9))
    (folder / "bad.png").symlink_to(outside)


def symlink_caption(folder: Path) -> None:
    secret = folder.parent.parent / "secret.txt"
    secret.write_text("root:x:0:0")
    (folder / "bad.png").write_bytes(image_bytes(7))
    (folder / "bad.txt").symlink_to(secret)


def fifo(folder: Path) -> None:
    os.mkfifo(folder / "bad.png")


def subfolder(folder: Path) -> None:
    (folder / "bad").mkdir()
    (folder / "bad" / "x.png").write_bytes(image_bytes(8))


def metadata_escape(folder: Path) -> None:
    # the target exists, so only the path check can keep it out
    (folder.parent.parent / "x.png").write_bytes(image_bytes(6))
    (folder / "metadata.csv").write_text("file_name,text\n../../x.png,escaped\n")


Setup = Callable[[Path], None]
CASES: dict[str, tuple[dict[str, bytes | str] | Setup, str, str]] = {
    # id: (bad files or a function that makes them, bad file name, expected reason part)
    "not_an_image": ({"bad.png": b"hello, not pixels", "bad.txt": "x"}, "bad.png",
                     "not an image"),
    "other_format_disguised": ({"bad.png": gif(), "bad.txt": "x"}, "bad.png", "not an image"),
    "truncated_png": ({"bad.png": noisy()[:-400], "bad.txt": "x"}, "bad.png",
                      "truncated or corrupt image"),
    "truncated_jpeg": ({"bad.jpg": noisy(fmt="JPEG")[:-500], "bad.txt": "x"},
                       "bad.jpg", "truncated or corrupt image"),
    "too_small": ({"bad.png": image_bytes(3, size=4), "bad.txt": "x"}, "bad.png",
                  "too small: 4x4"),
    "over_max_pixels": ({"bad.png": png_header_only(4000, 4000), "bad.txt": "x"}, "bad.png",
                        "16000000 pixels, over inbox.max_image_pixels = 1000000 (not decoded)"),
    "extension": ({"bad.gif": gif(), "bad.txt": "x"}, "bad.gif", "extension .gif not allowed"),
    "symlink_leaving_inbox": (symlink_outside, "bad.png", "symlink leaving the inbox"),
    "metadata_row_leaving": (metadata_escape, "../../x.png",
                             "metadata.csv row 2: path leaves the batch folder"),
    "caption_missing": ({"bad.png": image_bytes(4)}, "bad.png",
                        "caption missing (no bad.txt and no metadata.csv row; labelling is off)"),
    "caption_not_utf8": ({"bad.png": image_bytes(4), "bad.txt": b"caf\xe9 au lait"}, "bad.png",
                         "caption bad.txt is not UTF-8"),
    "caption_empty": ({"bad.png": image_bytes(4), "bad.txt": " \n\t "}, "bad.png",
                      "caption bad.txt is empty"),
    "caption_too_long": ({"bad.png": image_bytes(4), "bad.txt": "word " * 30}, "bad.png",
                         "longer than inbox.max_caption_chars = 100"),
    "caption_symlink": (symlink_caption, "bad.png", "bad.txt is a symlink (not followed)"),
    "duplicate_in_batch": ({"zz.png": image_bytes(1), "zz.txt": "same bytes as good1"},
                           "zz.png", "duplicate of good1.png (same bytes)"),
    "animated": ({"bad.png": apng(), "bad.txt": "x"}, "bad.png",
                 "animated or multi-page image (2 frames)"),
    "fifo": (fifo, "bad.png", "not a regular file"),
    "subfolder": (subfolder, "bad", "a sub-folder (batches are flat; not read)"),
    "same_stem": ({"good1.webp": image_bytes(11, fmt="WEBP")}, "good1.webp",
                  "same stem as good1.png"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_reason_journaled_and_good_files_accepted(
    make_env: Callable[..., Env], case: str
) -> None:
    env = make_env({"inbox": {"max_image_pixels": 1_000_000, "max_caption_chars": 100}})
    bad, bad_name, reason = CASES[case]
    folder = drop(env.inbox / "batch", dict(GOOD))
    if callable(bad):
        bad(folder)
    else:
        drop(folder, bad)

    [outcome] = env.intake.scan()

    assert outcome.status == "accepted"
    [accepted] = env.events("BatchAccepted")
    assert isinstance(accepted, ev.BatchAccepted)
    got = {b.file: b.reason for b in accepted.bad}
    assert reason in got[bad_name], got
    assert set(got) == {bad_name}, got  # nothing else was blamed
    assert [i.file for i in accepted.images] == ["good1.png", "good2.jpg"]
    store = env.state / "batches" / accepted.batch_id
    assert sorted(p.name for p in store.iterdir()) == [
        "good1.png", "good1.txt", "good2.jpg", "good2.txt"]
    assert sha((store / "good1.png").read_bytes()) == sha(GOOD["good1.png"])  # type: ignore[arg-type]
    assert (env.inbox / ".accepted" / "batch").is_dir()
    assert not (env.inbox / "batch").exists()


def test_all_bad_is_rejected_with_every_reason(env: Env) -> None:
    drop(env.inbox / "junk", {"a.png": b"nope", "a.txt": "x", "b.png": image_bytes(1),
                              "notes.md": "hello"})
    [outcome] = env.intake.scan()
    assert outcome.status == "rejected"
    [rejected] = env.events("BatchRejected")
    assert isinstance(rejected, ev.BatchRejected)
    assert rejected.reason == "no usable image (3 bad files)"
    assert {b.file for b in rejected.bad} == {"a.png", "b.png", "notes.md"}
    report = (env.inbox / ".rejected" / "junk" / "REJECTED.txt").read_text()
    for bad in rejected.bad:
        assert f"{bad.file}: {bad.reason}" in report
    assert (env.inbox / ".rejected" / "junk" / "a.png").read_bytes() == b"nope"
    assert not (env.state / "batches").exists() or not any((env.state / "batches").iterdir())


def test_fewer_than_min_images_is_rejected(make_env: Callable[..., Env]) -> None:
    env = make_env({"inbox": {"min_images": 3}})
    drop(env.inbox / "few", dict(GOOD))
    [outcome] = env.intake.scan()
    assert outcome.status == "rejected"
    [rejected] = env.events("BatchRejected")
    assert isinstance(rejected, ev.BatchRejected)
    assert rejected.reason == "2 usable images, fewer than inbox.min_images = 3"


def test_symlinked_batch_folder_is_rejected_unread(env: Env, tmp_path: Path) -> None:
    elsewhere = drop(tmp_path / "elsewhere", dict(GOOD))
    env.inbox.mkdir(parents=True, exist_ok=True)
    (env.inbox / "link").symlink_to(elsewhere)
    [outcome] = env.intake.scan()
    assert outcome.status == "rejected"
    assert (env.inbox / ".rejected" / "link").is_symlink()
    assert not (elsewhere / "REJECTED.txt").exists()  # nothing written through the link
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted([*GOOD, "READY"])


def test_mpo_jpeg_from_a_phone_is_accepted_as_its_primary_image(env: Env) -> None:
    """Unlike an animation, an MPO's first frame is by definition the photo (see validate.py)."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), (200, 0, 0)).save(
        buf, format="MPO", save_all=True, append_images=[Image.new("RGB", (16, 16))])
    drop(env.inbox / "phone", {"p.jpg": buf.getvalue(), "p.txt": "a phone photo"})
    [outcome] = env.intake.scan()
    assert outcome.status == "accepted" and not outcome.bad
    [accepted] = env.events("BatchAccepted")
    assert isinstance(accepted, ev.BatchAccepted)
    assert (accepted.images[0].width, accepted.images[0].height) == (40, 32)


def test_metadata_csv_not_utf8_blames_the_file_and_its_images(env: Env) -> None:
    drop(env.inbox / "m", {**GOOD, "bad.png": image_bytes(5),
                           "metadata.csv": b"file_name,text\nbad.png,caf\xe9\nghost.png,boo\n"})
    env.intake.scan()
    [accepted] = env.events("BatchAccepted")
    assert isinstance(accepted, ev.BatchAccepted)
    assert {b.file: b.reason for b in accepted.bad} == {
        "metadata.csv": "metadata.csv is not UTF-8 (byte 26)",
        "bad.png": "caption missing (metadata.csv is not UTF-8 (byte 26))",
    }
    assert [i.file for i in accepted.images] == ["good1.png", "good2.jpg"]


def test_metadata_csv_row_for_a_missing_file(env: Env) -> None:
    drop(env.inbox / "m", {**GOOD, "metadata.csv": "file_name,text\nghost.png,boo\n"})
    env.intake.scan()
    [accepted] = env.events("BatchAccepted")
    assert isinstance(accepted, ev.BatchAccepted)
    assert [(b.file, b.reason) for b in accepted.bad] == [
        ("ghost.png", "metadata.csv row 2: no such file in the batch")]
