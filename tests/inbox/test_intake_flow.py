"""The accepted path end to end: store layout, captions and their sources, duplicates, name
clashes, the labeller hook, the `batches` rows and the watcher."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from lora_service.inbox.intake import LABEL_ATTEMPTS, LABEL_RETRY_S, batch_id_of
from lora_service.inbox.queries import list_batches
from lora_service.inbox.watch import InboxWatcher
from lora_service.journal import events as ev

from .conftest import Env, drop, image_bytes, sha


def accepted(env: Env) -> list[ev.BatchAccepted]:
    return [e for e in env.events("BatchAccepted") if isinstance(e, ev.BatchAccepted)]


def test_store_layout_hashes_and_normalised_captions(env: Env) -> None:
    a, b = image_bytes(1), image_bytes(2, fmt="BMP")
    drop(env.inbox / "cats", {"a.png": a, "a.txt": "  a   tabby\n\tcat \n", "b.bmp": b,
                              "b.txt": "\ufeffa black cat"})
    [outcome] = env.intake.scan()
    [event] = accepted(env)
    assert outcome.batch_id == event.batch_id == batch_id_of(
        [(sha(a), "a tabby cat"), (sha(b), "a black cat")])
    assert [(i.file, i.caption, i.caption_source, i.width) for i in event.images] == [
        ("a.png", "a tabby cat", "sidecar", 32), ("b.bmp", "a black cat", "sidecar", 32)]
    folder = env.state / "batches" / event.batch_id
    assert (folder / "a.txt").read_text() == "a tabby cat"
    assert set(event.files) == {f"batches/{event.batch_id}/{n}"
                                for n in ("a.png", "a.txt", "b.bmp", "b.txt")}
    for rel, digest in event.files.items():
        assert sha((env.state / rel).read_bytes()) == digest
    assert event.moved_to == ".accepted/cats"
    assert (env.inbox / ".accepted/cats/a.txt").read_text() == "  a   tabby\n\tcat \n"


def test_metadata_csv_captions_and_sidecar_wins(env: Env) -> None:
    drop(env.inbox / "hf", {
        "a.png": image_bytes(1), "b.png": image_bytes(2), "b.txt": "from the sidecar",
        "metadata.csv": 'file_name,text\na.png,"from, the csv"\nb.png,loses\n',
    })
    env.intake.scan()
    [event] = accepted(env)
    assert [(i.file, i.caption, i.caption_source) for i in event.images] == [
        ("a.png", "from, the csv", "metadata.csv"), ("b.png", "from the sidecar", "sidecar")]
    assert "b.png: caption in both b.txt and metadata.csv; the sidecar wins" in event.notes
    assert not event.bad


def test_same_content_twice_is_a_duplicate_and_name_clash_gets_suffix(env: Env) -> None:
    files: dict[str, bytes | str] = {"a.png": image_bytes(1), "a.txt": "a cat"}
    drop(env.inbox / "one", files)
    drop(env.inbox / "two", {"renamed.png": image_bytes(1), "renamed.txt": " a  cat"})
    outcomes = env.intake.scan()
    assert [(o.name, o.status) for o in outcomes] == [("one", "accepted"), ("two", "duplicate")]
    [dup] = env.events("BatchDuplicate")
    assert isinstance(dup, ev.BatchDuplicate)
    assert (dup.duplicate_of, dup.batch_id) == ("one", outcomes[0].batch_id)
    assert len(list((env.state / "batches").iterdir())) == 1  # trained once
    drop(env.inbox / "one", files)  # the same name dropped again
    [again] = env.intake.scan()
    assert (again.status, again.moved_to) == ("duplicate", ".accepted/one-1")
    assert (env.inbox / ".accepted/one/a.png").exists()  # never overwritten
    assert (env.inbox / ".accepted/one-1/a.png").exists()


def test_labeller_hook_captions_images_without_one(make_env: Callable[..., Env]) -> None:
    calls: list[list[Path]] = []

    def labeller(paths: list[Path]) -> dict[str, str]:
        calls.append(paths)
        assert all(p.is_file() for p in paths)  # the checked copies, readable
        return {p.name: f"tag-{p.stem},  photo " for p in paths}

    labeller.model = "ViT-test"  # type: ignore[attr-defined]
    labeller.weights_sha256 = "ab" * 32  # type: ignore[attr-defined]
    env = make_env({"labelling": {"enabled": True, "weights": "clip.bin"}}, labeller=labeller)
    drop(env.inbox / "raw", {"a.png": image_bytes(1), "b.png": image_bytes(2), "b.txt": "mine"})
    env.intake.scan()
    assert [[p.name for p in c] for c in calls] == [["a.png"]]
    [event] = accepted(env)
    assert [(i.file, i.caption, i.caption_source) for i in event.images] == [
        ("a.png", "tag-a, photo", "clip"), ("b.png", "mine", "sidecar")]
    [generated] = env.events("CaptionsGenerated")
    assert isinstance(generated, ev.CaptionsGenerated)
    assert (generated.name, generated.model, generated.captions) == (
        "raw", "ViT-test", {"a.png": "tag-a, photo"})
    assert (env.state / "batches" / event.batch_id / "a.txt").read_text() == "tag-a, photo"
    assert list_batches(env.journal)[0]["caption_sources"] == ["clip", "sidecar"]


def test_failing_labeller_marks_only_uncaptioned_images_after_its_last_attempt(
    make_env: Callable[..., Env],
) -> None:
    """A labeller that keeps raising: undecided until its last attempt, then only the images
    without a caption are bad, with the reason."""
    calls: list[float] = []

    def labeller(paths: list[Path]) -> dict[str, str]:
        calls.append(time.time())
        raise RuntimeError("weights missing")

    env = make_env({"labelling": {"enabled": True, "weights": "clip.bin"}}, labeller=labeller)
    drop(env.inbox / "raw", {"a.png": image_bytes(1), "b.png": image_bytes(2), "b.txt": "mine"})
    now = time.time()
    for wait in (0.0, *LABEL_RETRY_S):
        assert not accepted(env)
        now += wait
        env.intake.scan(now=now)
    assert len(calls) == LABEL_ATTEMPTS == 3
    [event] = accepted(env)
    assert [i.file for i in event.images] == ["b.png"]
    assert [(b.file, b.reason) for b in event.bad] == [
        ("a.png", "caption missing; labelling failed 3 times (RuntimeError: weights missing)")]


def test_list_batches_statuses(env: Env) -> None:
    drop(env.inbox / "a", {"a.png": image_bytes(1), "a.txt": "a", "x.png": b"junk"})
    drop(env.inbox / "b", {"a.png": image_bytes(1), "a.txt": "a"})
    drop(env.inbox / "c", {"c.png": b"junk"})
    drop(env.inbox / "d", {"d.png": image_bytes(4), "d.txt": "d"})
    outcomes = {o.name: o for o in env.intake.scan()}
    trained = outcomes["d"].batch_id
    assert trained is not None
    env.journal.append(
        ev.VersionCreated(version="v0001", run_id="r1", parent=None, batches=(trained,),
                          new_batches=(trained,), images=1, step=2, steps=2, train_loss=0.1,
                          val_loss=None, base_sha256="0" * 64),
        ev.HeadMoved(version="v0001", previous=None, reason="first", by="promotion"),
    )
    rows = {r["name"]: r for r in list_batches(env.journal)}
    assert {n: r["status"] for n, r in rows.items()} == {
        "a": "pending", "b": "duplicate", "c": "rejected", "d": "trained in v0001"}
    assert rows["a"]["bad"] == [{"file": "x.png", "reason": rows["a"]["bad"][0]["reason"]}]
    assert rows["a"]["images"] == 1 and rows["a"]["caption_sources"] == ["sidecar"]
    assert rows["b"]["batch_id"] == rows["a"]["batch_id"]
    assert rows["c"]["reason"] == "no usable image (1 bad files)"
    assert rows["c"]["moved_to"] == ".rejected/c"
    assert [r["seq"] for r in rows.values()] == sorted(r["seq"] for r in rows.values())


def test_watcher_wakes_on_drops_not_on_moves_out(env: Env) -> None:
    env.inbox.mkdir(parents=True, exist_ok=True)
    woke = threading.Event()
    with InboxWatcher(env.inbox, woke.set):
        drop(env.inbox / "w", {"a.png": image_bytes(1), "a.txt": "a"}, ready=False)
        assert woke.wait(5)
        time.sleep(0.2)
        woke.clear()
        (env.inbox / ".accepted").mkdir()
        (env.inbox / ".accepted" / "x").write_text("quiet")
        assert not woke.wait(0.5)


def test_folders_moved_back_into_the_inbox_are_decided_again(env: Env) -> None:
    """A user fixes a rejected batch and moves it back (REJECTED.txt still inside), or moves an
    accepted one back: neither is mistaken for an interrupted move."""
    drop(env.inbox / "fixme", {"a.png": b"junk", "a.txt": "a"})
    drop(env.inbox / "again", {"b.png": image_bytes(2), "b.txt": "b"})
    assert [o.status for o in env.intake.scan()] == ["accepted", "rejected"]
    time.sleep(1.2)
    rejected = env.inbox / ".rejected" / "fixme"
    assert (rejected / "REJECTED.txt").exists()
    (rejected / "a.png").write_bytes(image_bytes(1))
    rejected.rename(env.inbox / "fixme")
    (env.inbox / ".accepted" / "again").rename(env.inbox / "again")
    outcomes = {o.name: o for o in env.intake.scan()}
    assert (outcomes["fixme"].status, outcomes["fixme"].moved_to) == ("accepted",
                                                                      ".accepted/fixme")
    assert (outcomes["again"].status, outcomes["again"].finished) == ("duplicate", False)
    assert (env.inbox / ".accepted" / "again" / "b.png").is_file()
