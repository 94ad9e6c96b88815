"""Hostile or unlucky inbox contents get a reason and a decision, never a jam: `.accepted` /
`.rejected` that are not real folders, names that are not UTF-8, a huge metadata.csv, a user's
own REJECTED.txt, upper-case sidecars, and a labeller that fails once."""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_service.journal import events as ev

from .conftest import Env, drop, image_bytes, sha

GOOD: dict[str, bytes | str] = {"a.png": image_bytes(1), "a.txt": "a red square",
                                "b.png": image_bytes(2), "b.txt": "a green square"}
BAD: dict[str, bytes | str] = {"a.png": b"not pixels", "a.txt": "broken"}


def decisions(env: Env) -> list[ev.Event]:
    return env.events("BatchAccepted", "BatchRejected", "BatchDuplicate")


# -- item 2: .accepted / .rejected are never followed ------------------------------------------


@pytest.mark.parametrize("how", ["symlink", "file"])
@pytest.mark.parametrize("kind", [".accepted", ".rejected"])
def test_destination_that_is_not_a_real_folder_is_never_followed(
    env: Env, tmp_path: Path, kind: str, how: str
) -> None:
    """The batch is decided with the reason in its notes and stays in the inbox, untouched by
    later scans, until the operator makes the destination a real folder; then it moves."""
    outside = tmp_path / "outside"
    outside.mkdir()
    env.inbox.mkdir(parents=True)
    if how == "symlink":
        (env.inbox / kind).symlink_to(outside)
    else:
        (env.inbox / kind).write_text("not a folder")
    drop(env.inbox / "b", GOOD if kind == ".accepted" else BAD)

    outcomes = env.intake.scan()
    assert list(outside.iterdir()) == []  # neither the batch nor REJECTED.txt went through it
    assert (env.inbox / "b" / "a.png").is_file()
    [outcome] = outcomes
    assert outcome.status == ("accepted" if kind == ".accepted" else "rejected")
    [decided] = decisions(env)
    assert isinstance(decided, ev.BatchAccepted | ev.BatchRejected)
    why = "is a symlink (never followed)" if how == "symlink" else "is not a folder"
    assert outcome.not_moved is not None and f"inbox/{kind} {why}" in outcome.not_moved
    assert decided.notes[0].startswith(f"not moved: {outcome.not_moved}")
    for _ in range(2):
        assert env.intake.scan() == []
    assert len(decisions(env)) == 1 and len(env.events("BatchDetected")) == 1

    (env.inbox / kind).unlink()  # the operator fixes it: only the move was missing
    [done] = env.intake.scan()
    assert done.finished and (env.inbox / kind / "b" / "a.png").is_file()
    assert not (env.inbox / "b").exists() and len(decisions(env)) == 1


# -- item 5: names that are not UTF-8 -----------------------------------------------------------


def test_names_that_are_not_utf8_are_journaled_escaped_and_decided_once(env: Env) -> None:
    inbox = os.fsencode(env.inbox)
    good, junk = inbox + b"/bad\xff", inbox + b"/junk\\\xfe"
    for folder in (good, junk):
        os.makedirs(folder)
    files = {good: {b"a.png": image_bytes(1), b"a.txt": b"a cat", b"\xfe.png": image_bytes(2),
                    b"caf\xe9.txt": b"x", b"READY": b""},
             junk: {b"\xff.png": image_bytes(3), b"READY": b""}}
    for folder, content in files.items():
        for name, data in content.items():
            with open(folder + b"/" + name, "wb") as fh:
                fh.write(data)
    os.symlink(b"/nowhere/\xff.png", good + b"/link.png")

    outcomes = {o.name: o for o in env.intake.scan()}
    assert {n: o.status for n, o in outcomes.items()} == {
        "bad\\xff": "accepted", "junk\\\\\\xfe": "rejected"}
    for _ in range(2):
        assert env.intake.scan() == []
    assert len(decisions(env)) == 2 and len(env.events("BatchDetected")) == 2
    accepted, rejected = decisions(env)
    assert isinstance(accepted, ev.BatchAccepted) and isinstance(rejected, ev.BatchRejected)
    not_utf8 = "file name is not UTF-8 (shown with \\x escapes); rename it"
    assert {b.file: b.reason for b in accepted.bad} == {
        "\\xfe.png": not_utf8, "caf\\xe9.txt": not_utf8,
        "link.png": "symlink leaving the inbox (-> /nowhere/\\xff.png); not followed"}
    assert [i.file for i in accepted.images] == ["a.png"]
    assert accepted.notes[0] == ("the folder's name is not UTF-8 or holds a backslash: journaled "
                                 "and moved as bad\\xff")
    assert [(b.file, b.reason) for b in rejected.bad] == [("\\xff.png", not_utf8)]
    assert os.listdir(env.inbox / ".accepted") == ["bad\\xff"]  # renamed to its escaped name
    assert os.listdir(env.inbox / ".rejected") == ["junk\\\\\\xfe"]
    assert sorted(os.listdir(os.fsencode(env.inbox / ".accepted" / "bad\\xff"))) == sorted(
        [*files[good], b"link.png"])


# -- item 6: a huge metadata.csv ----------------------------------------------------------------


def test_huge_metadata_csv_gives_a_bounded_event(env: Env) -> None:
    rows = [f"f{i:06d}.png,c" for i in range(300_000)]
    rows[1000:1000] = ["a.png,a red square", "b.png,a green square"]
    rows += ["../escape.png,x"] * 30 + ["a.png,again"] * 30
    csv = "file_name,text\n" + "\n".join(rows) + "\n"
    assert len(csv) > 4_000_000
    drop(env.inbox / "huge", {"a.png": image_bytes(1), "b.png": image_bytes(2),
                              "metadata.csv": csv})

    tracemalloc.start()
    try:
        [outcome] = env.intake.scan()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    sizes = env.journal.query("SELECT type, length(CAST(payload AS BLOB)) AS n FROM events")
    largest = max(r["n"] for r in sizes)
    print(f"metadata.csv {len(csv):,} bytes: largest event payload {largest:,} bytes, "
          f"traced peak {peak / 2**20:.1f} MiB")

    assert outcome.status == "accepted"
    assert largest < 1_000_000
    assert peak < 32 * 2**20  # the file itself, decoded once, plus a few rows
    [event] = env.events("BatchAccepted")
    assert isinstance(event, ev.BatchAccepted)
    assert [(i.file, i.caption, i.caption_source) for i in event.images] == [
        ("a.png", "a red square", "metadata.csv"), ("b.png", "a green square", "metadata.csv")]
    reasons = [b.reason for b in event.bad]
    assert "… and 299,980 more rows naming files not in the batch" in reasons
    assert "… and 10 more rows whose file_name is not a file directly in the batch folder" in (
        reasons)
    assert len(reasons) == 20 + 1 + 20 + 1
    assert "metadata.csv: … and 10 more rows naming a file already captioned; ignored" in (
        event.notes)


def test_thousands_of_bad_files_are_listed_then_counted(env: Env) -> None:
    """Every event stays small however many bad files a folder holds (the REJECTED.txt report
    in the folder still lists them all)."""
    drop(env.inbox / "junk", {**GOOD, **{f"x{i:04d}.gif": b"" for i in range(1000)}})
    [outcome] = env.intake.scan()
    [event] = env.events("BatchAccepted")
    assert isinstance(event, ev.BatchAccepted) and outcome.status == "accepted"
    assert len(event.bad) == 301
    assert event.bad[-1] == ev.BadFile(file="…", reason="and 700 more bad files, not listed")


# -- item 8: the user's own REJECTED.txt; upper-case sidecars -----------------------------------


def test_a_users_own_rejected_txt_is_kept(env: Env) -> None:
    drop(env.inbox / "mine", {**BAD, "REJECTED.txt": "my own notes"})
    [outcome] = env.intake.scan()
    assert outcome.status == "rejected"
    moved = env.inbox / ".rejected" / "mine"
    assert (moved / "REJECTED.txt").read_text() == "my own notes"
    report = (moved / "REJECTED-lora-service.txt").read_text()
    assert report.startswith("lora-service rejected batch 'mine': no usable image")
    [rejected] = env.events("BatchRejected")
    assert isinstance(rejected, ev.BatchRejected)
    assert ("REJECTED.txt is the user's own and is kept; the report is "
            "REJECTED-lora-service.txt") in rejected.notes


def test_sidecars_match_their_image_as_kohya_users_expect(env: Env) -> None:
    """Stem exactly, `.txt` in any case (`A.TXT` for `A.PNG`); `.txt` itself wins a tie."""
    drop(env.inbox / "caps", {
        "A.PNG": image_bytes(1), "A.TXT": "upper case sidecar",
        "B.png": image_bytes(2), "B.Txt": "mixed case extension",
        "C.png": image_bytes(3), "C.txt": "the exact name", "C.TXT": "loses",
        "d.png": image_bytes(4), "D.txt": "stem differs in case",
    })
    [outcome] = env.intake.scan()
    [event] = env.events("BatchAccepted")
    assert isinstance(event, ev.BatchAccepted) and outcome.status == "accepted"
    assert [(i.file, i.caption, i.caption_source) for i in event.images] == [
        ("A.PNG", "upper case sidecar", "sidecar"), ("B.png", "mixed case extension", "sidecar"),
        ("C.png", "the exact name", "sidecar")]
    assert [(b.file, b.reason) for b in event.bad] == [
        ("d.png", "caption missing (no d.txt and no metadata.csv row; labelling is off)")]
    assert "C.TXT: not used; C.png's caption is C.txt" in event.notes
    assert ("D.txt: caption file without an image (d.png differs in case; a caption's name "
            "must match its image's exactly); ignored") in event.notes
    store = env.state / "batches" / event.batch_id
    assert (store / "A.txt").read_text() == "upper case sidecar"
    assert sha((store / "A.PNG").read_bytes()) == event.images[0].sha256


# -- item 11 (part): a labeller that fails once -------------------------------------------------


def test_a_labeller_that_fails_once_is_retried_later(make_env: Callable[..., Env]) -> None:
    calls: list[list[str]] = []

    def labeller(paths: list[Path]) -> dict[str, str]:
        calls.append([p.name for p in paths])
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return {p.name: f"clip says {p.stem}" for p in paths}

    env = make_env({"labelling": {"enabled": True, "weights": "clip.bin"}}, labeller=labeller)
    drop(env.inbox / "raw", {"a.png": image_bytes(1), "b.png": image_bytes(2), "b.txt": "mine"})
    now = time.time()
    assert env.intake.scan(now=now) == []
    assert env.intake.scan(now=now + 1) == []  # not retried at once: it may be transient
    assert calls == [["a.png"]] and decisions(env) == []
    [outcome] = env.intake.scan(now=now + 3600)
    assert outcome.status == "accepted" and not outcome.bad
    [event] = env.events("BatchAccepted")
    assert isinstance(event, ev.BatchAccepted)
    assert [(i.file, i.caption, i.caption_source) for i in event.images] == [
        ("a.png", "clip says a", "clip"), ("b.png", "mine", "sidecar")]
    assert len(env.events("BatchDetected")) == 1 and len(env.events("CaptionsGenerated")) == 1
