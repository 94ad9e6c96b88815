"""Whatever a batch folder holds or however it is named, it is decided once and never jams the
inbox (no decision retried with a traceback every scan): names too long to move, symlink loops,
a file growing while read, names and link targets that would bloat the journal, a report that
cannot be written, folders the daemon may not read, names that only differ by escaping, and an
image named REJECTED.png."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from structlog.testing import capture_logs

from lora_service.config import load_config
from lora_service.inbox import validate
from lora_service.journal import Journal
from lora_service.journal import events as ev

from .conftest import Env, drop, image_bytes, sha

GOOD: dict[str, bytes | str] = {"a.png": image_bytes(1), "a.txt": "a red square",
                                "b.png": image_bytes(2), "b.txt": "a green square"}
BAD: dict[str, bytes | str] = {"a.png": b"not pixels", "a.txt": "broken"}
CHILD = Path(__file__).with_name("_intake_child.py")
NOBODY = 65534  # the uid root's permission test runs the intake as (`nobody` on Linux)


def decisions(env: Env) -> list[Any]:
    return env.events("BatchAccepted", "BatchRejected", "BatchDuplicate")


def write_tree(folder: bytes, files: dict[bytes, bytes]) -> None:
    os.makedirs(folder)
    for name, data in files.items():
        with open(folder + b"/" + name, "wb") as fh:
            fh.write(data)


def settled(env: Env, scans: int = 2) -> None:
    """Later scans find nothing to do: every folder was decided once and moved."""
    for _ in range(scans):
        assert env.intake.scan() == []


# -- finding 1: names too long to move ------------------------------------------------------------


def test_long_folder_names_are_moved_under_a_name_that_fits(env: Env) -> None:
    """A 70-byte name that is not UTF-8 escapes to 280 characters; a 255-byte name needs `-1`
    when its first drop already took that name: both are cut to NAME_MAX bytes (with a hash)."""
    inbox = os.fsencode(env.inbox)
    files = {b"a.png": image_bytes(1), b"a.txt": b"a red square", b"READY": b""}
    write_tree(inbox + b"/" + b"\xff" * 70, files)
    write_tree(inbox + b"/" + b"n" * 255, {**files, b"a.png": image_bytes(2)})
    assert {o.status for o in env.intake.scan()} == {"accepted"}
    write_tree(inbox + b"/" + b"n" * 255, {**files, b"a.png": image_bytes(3)})
    [again] = env.intake.scan()
    settled(env)

    assert os.listdir(env.inbox) == [".accepted"]
    moved = os.listdir(os.fsencode(env.inbox / ".accepted"))
    assert len(moved) == 3 and all(len(name) <= 255 for name in moved)
    assert again.moved_to != f".accepted/{'n' * 255}" and len(decisions(env)) == 3
    assert f"the name is longer than 255 bytes: moved as {again.moved_to[:200]}…" in (
        decisions(env)[-1].notes)


@pytest.mark.parametrize("outcome", ["accepted", "rejected"])
def test_a_decision_whose_destination_cannot_be_looked_up_does_not_jam(
    env: Env, outcome: str
) -> None:
    """A journaled `moved_to` the file system refuses (ENAMETOOLONG, as an older intake wrote
    for long names) is neither an exception at every scan nor a move retried forever: the
    folder is decided anew, under a name that fits."""
    drop(env.inbox / "x", GOOD if outcome == "accepted" else BAD)
    (env.inbox / ".accepted").mkdir()
    (env.inbox / ".rejected").mkdir()
    moved_to = f".{outcome}/" + "n" * 300
    env.journal.append(ev.BatchDetected(name="x"))
    env.journal.append(
        ev.BatchAccepted(name="x", batch_id="0" * 16, moved_to=moved_to, images=(ev.ImageRecord(
            file="a.png", sha256=sha(image_bytes(1)), caption="a red square",
            caption_source="sidecar", width=32, height=32),))
        if outcome == "accepted" else ev.BatchRejected(name="x", reason="old", moved_to=moved_to))
    [again] = env.intake.scan()
    assert again.status == outcome and again.moved_to == f".{outcome}/x"
    settled(env)
    assert len(env.events("BatchDetected")) == 2


# -- finding 2: symlinks judged from their text ---------------------------------------------------


def test_symlinks_are_judged_from_their_text_never_resolved(env: Env) -> None:
    folder = drop(env.inbox / "b", GOOD)
    links = {"loop.png": "loop.png", "ping.png": "pong.png", "pong.png": "ping.png",
             "up.png": "../../outside.png", "deep.png": "x/../../../outside.png",
             "side.png": "../other/a.png", "here.png": "./sub/../a.png"}
    for name, target in links.items():
        os.symlink(target, folder / name)
    [outcome] = env.intake.scan()
    settled(env)
    assert outcome.status == "accepted" and outcome.images == 2
    reasons = {b.file: b.reason for b in outcome.bad}
    for name, target in links.items():
        leaves = name in ("up.png", "deep.png")
        assert reasons[name] == (
            f"symlink leaving the inbox (-> {target}); not followed" if leaves else
            f"symlink (-> {target}); links are not followed, copy the file itself")


# -- finding 3: a file growing between fstat and read ---------------------------------------------


def test_an_image_growing_while_read_is_bad_and_never_read_past_its_size(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A racer extending `a.png` past the size limit after its size was checked (here: when
    Pillow parses its header) cannot make intake read, or store, more than that size."""
    env = make_env({"inbox": {"max_image_pixels": 1_000_000}})
    folder = drop(env.inbox / "g", GOOD)
    limits = env.intake.limits
    limit = max(validate.MIN_FILE_BYTES_LIMIT, limits.max_pixels * validate.MAX_BYTES_PER_PIXEL)
    original = Image.open
    grown: list[int] = []

    def open_then_grow(fp: Any, *args: Any, **kwargs: Any) -> Any:
        image = original(fp, *args, **kwargs)
        fd = getattr(fp, "name", None)  # an int for the file itself, none for its bytes
        if isinstance(fd, int) and os.readlink(f"/proc/self/fd/{fd}").endswith("/a.png"):
            os.truncate(folder / "a.png", limit + 1)  # sparse: costs no disk
            grown.append(fd)
        return image

    monkeypatch.setattr(Image, "open", open_then_grow)
    tracemalloc.start()
    try:
        [outcome] = env.intake.scan()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert grown and outcome.status == "accepted" and outcome.images == 1
    size = len(GOOD["a.png"])
    assert outcome.bad == (ev.BadFile(file="a.png", reason=(
        f"file changed while read ({size} bytes when opened); drop it again once it is "
        "complete")),)
    assert peak < limit // 2
    stored = env.state / "batches" / str(outcome.batch_id)
    assert sorted(p.name for p in stored.iterdir()) == ["b.png", "b.txt"]


# -- finding 4: names and link targets cannot bloat an event or the report ------------------------


def test_long_names_and_link_targets_give_a_bounded_event_and_report(env: Env) -> None:
    """400 links to 4,000-byte targets, with names of control characters (6 bytes each in
    JSON), and 250 hidden files with long names that are not UTF-8: everything quoted is
    clipped and the listed bad files and notes stop at a byte budget."""
    folder = os.fsencode(env.inbox / "big")
    write_tree(folder, {b"READY": b""})
    for i in range(400):
        os.symlink(b"\xfe" * 4000 if i % 2 else b"\x01" * 4000,
                   folder + b"/" + b"\x01" * 240 + b"%03d.png" % i)
    for i in range(250):
        with open(folder + b"/." + bytes([0x80 + i % 64]) * 3 + b"\xff" * 240 + b"%d" % i, "wb"):
            pass
    [outcome] = env.intake.scan()
    assert outcome.status == "rejected"
    sizes = env.journal.query("SELECT type, length(CAST(payload AS BLOB)) AS n FROM events")
    assert max(r["n"] for r in sizes) < 1_000_000
    [event] = env.events("BatchRejected")
    assert 50 < len(event.bad) < 301  # the byte budget stopped the list, not the count
    assert event.bad[-1].file == "…" and event.bad[-1].reason.endswith("more bad files, not listed")
    assert all(len(b.reason) < 300 for b in event.bad)
    assert all(len(n) < 300 for n in event.notes)
    assert event.notes[-1] == "… and 50 more notes, not listed"
    assert os.path.getsize(env.inbox / ".rejected" / "big" / "REJECTED.txt") < 1_000_000


# -- finding 6: a report that cannot be written ---------------------------------------------------


def test_no_free_report_name_is_a_note_not_a_jam(env: Env) -> None:
    """Every name our report could take is the user's own file: decided once, kept as it is."""
    names = ["REJECTED.txt", "REJECTED-lora-service.txt",
             *(f"REJECTED-lora-service-{n}.txt" for n in range(2, 1000))]
    drop(env.inbox / "full", {**BAD, **dict.fromkeys(names, "mine")})
    [outcome] = env.intake.scan()
    settled(env)
    assert outcome.status == "rejected" and outcome.not_moved is None
    [event] = env.events("BatchRejected")
    assert event.notes[0] == "no report written into the folder (no free name for the report)"
    moved = env.inbox / ".rejected" / "full"
    assert all((moved / name).read_text() == "mine" for name in names)


def _chattr(flag: str, path: Path) -> bool:
    tool = shutil.which("chattr")
    return tool is not None and subprocess.run(
        [tool, flag, str(path)], capture_output=True).returncode == 0


def test_an_immutable_batch_folder_is_decided_once(env: Env) -> None:
    """`chattr +i`: neither the report nor the move can be done. The rejection is journaled
    once with a note; the folder stays (logged once) until the operator lifts the flag."""
    folder = drop(env.inbox / "ro", BAD)
    if not _chattr("+i", folder):
        pytest.skip("chattr +i is not available here (needs root and ext4/xfs/btrfs/tmpfs)")
    try:
        with capture_logs() as logs:
            [outcome] = env.intake.scan()
            settled(env, scans=3)
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["batch not moved"]
        assert outcome.status == "rejected" and (folder / "a.png").is_file()
        assert outcome.not_moved == (
            "the move to inbox/.rejected/ro failed (Operation not permitted)")
        [event] = env.events("BatchRejected")
        assert event.notes[0] == "no report written into the folder (Operation not permitted)"
        assert len(env.events("BatchDetected")) == 1
    finally:
        _chattr("-i", folder)
    env.intake.scan()  # moved now (and decided again with a report, if chattr bumped ctime late)
    assert (env.inbox / ".rejected" / "ro" / "a.png").is_file()


# -- finding 7: folders the daemon may not read ---------------------------------------------------


@pytest.fixture
def shared_root(tmp_path: Path) -> Iterator[Path]:
    """A folder the unprivileged child can use: tmp_path when we are not root; as root, a
    folder outside pytest's private tmp, owned by `nobody`."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    try:
        pwd.getpwuid(NOBODY)
    except KeyError:
        pytest.skip(f"as root, this needs a user {NOBODY} (nobody) to drop to")
    root = Path(tempfile.mkdtemp(prefix="lora-intake-"))
    try:
        os.chmod(root, 0o755)
        os.chown(root, NOBODY, NOBODY)
        yield root
    finally:
        for path in [root, *root.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                os.chmod(path, 0o755)
        shutil.rmtree(root)


def run_intake_unprivileged(root: Path, config_path: Path) -> None:
    """One scan in a child process as a user chmod applies to (`nobody` when we are root)."""
    as_nobody: list[str] = []
    if os.geteuid() == 0:
        for path in [root, *root.rglob("*")]:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        as_nobody = ["--user", str(NOBODY)]
    done = subprocess.run([sys.executable, str(CHILD), str(config_path), "once", *as_nobody],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "intake failed" not in done.stdout + done.stderr


def test_a_folder_the_daemon_may_not_read_is_rejected_once(
    shared_root: Path, write_config: Callable[..., Path]
) -> None:
    """chmod 000 (not readable) and 644 (readable, not searchable): each is rejected unread
    with the reason, once; it stays where it is when it cannot be moved either."""
    config_path = shared_root / "config.yaml"
    shutil.copy(write_config({"paths": {"inbox": str(shared_root / "inbox"),
                                        "state": str(shared_root / "state")}}), config_path)
    inbox = shared_root / "inbox"
    for name in ("locked", "noexec"):
        drop(inbox / name, GOOD)
    try:
        for name, mode in (("locked", 0o000), ("noexec", 0o644)):
            os.chmod(inbox / name, mode)
        for _ in range(2):
            run_intake_unprivileged(shared_root, config_path)
    finally:
        for name in ("locked", "noexec"):
            for where in (inbox, inbox / ".rejected"):
                if (where / name).exists():
                    os.chmod(where / name, 0o755)
    journal = Journal.for_state(load_config(config_path).paths.state)
    try:
        rejected = {e.event.name: e.event.reason
                    for e in journal.events(types=("BatchRejected",))}
        decided = [e.event.name for e in journal.events(
            types=("BatchAccepted", "BatchRejected", "BatchDuplicate"))]
        detected = [e.event.name for e in journal.events(types=("BatchDetected",))]
    finally:
        journal.close()
    assert rejected == {
        "locked": "the batch folder cannot be read (Permission denied); not read",
        "noexec": "the batch folder cannot be searched (no x permission for us); not read"}
    assert sorted(decided) == sorted(detected) == ["locked", "noexec"]


# -- finding 8: escaped names never collide -------------------------------------------------------


def test_names_that_only_differ_by_escaping_are_two_batches(env: Env) -> None:
    """`cats` + byte 0xff and the UTF-8 name `cats\\xff` (a real backslash) are journaled under
    different names, and moved to different folders."""
    inbox = os.fsencode(env.inbox)
    write_tree(inbox + b"/cats\xff", {b"a.png": image_bytes(1), b"a.txt": b"one",
                                      b"READY": b""})
    write_tree(inbox + b"/cats\\xff", {b"a.png": image_bytes(2), b"a.txt": b"two",
                                       b"READY": b""})
    outcomes = env.intake.scan()
    settled(env)
    assert sorted(o.name for o in outcomes) == ["cats\\\\xff", "cats\\xff"]
    assert {o.status for o in outcomes} == {"accepted"}
    assert sorted(os.listdir(env.inbox / ".accepted")) == ["cats\\\\xff", "cats\\xff"]
    assert len(env.events("BatchDetected")) == 2


# -- finding 9: REJECTED.png has a sidecar like any image ----------------------------------------


def test_an_image_named_rejected_keeps_its_sidecar(env: Env) -> None:
    drop(env.inbox / "b", {"REJECTED.png": image_bytes(7), "REJECTED.txt": "a portrait", **GOOD})
    [outcome] = env.intake.scan()
    assert outcome.status == "accepted" and not outcome.bad
    [event] = env.events("BatchAccepted")
    assert [(i.file, i.caption) for i in event.images] == [
        ("REJECTED.png", "a portrait"), ("a.png", "a red square"), ("b.png", "a green square")]
