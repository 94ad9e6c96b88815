"""The state folder's file primitives: atomic writes, sha256, the single-instance lock.

Every file the journal points at is written to a temporary name in its own folder, fsynced,
renamed over the final name and the folder fsynced, so after a crash a path holds either the
old bytes or the new ones, never a torn mix.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from lora_service.errors import UsageError

CHUNK = 1 << 20
# a write refused by the disk itself: full, over quota, failing, or remounted read-only
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
_SQLITE_DISK = {13: "database or disk is full", 10: "disk I/O error"}  # SQLITE_FULL, _IOERR
# how libraries that hide the errno say it (safetensors, sqlite through JournalError)
_DISK_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded",
               "Input/output error", "Read-only file system", *_SQLITE_DISK.values())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def disk_trouble(exc: BaseException | None) -> str | None:
    """Why `exc`, or an exception it was raised from, is the disk's fault (one line); None when
    it is not. Such a failure says nothing about the work that hit it: retry it, later."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return os.strerror(exc.errno) + (f": {exc.filename}" if exc.filename else "")
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in _SQLITE_DISK:
            return _SQLITE_DISK[code & 0xFF]
        text = str(exc)
        if any(word in text for word in _DISK_WORDS):
            return text.splitlines()[0][:300] if text else type(exc).__name__
        exc = exc.__cause__ or exc.__context__
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` only once it is completely on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write `data` atomically and return its sha256."""
    with atomic_writer(path) as fh:
        fh.write(data)
    return sha256_bytes(data)


def atomic_copy(src: Path, dst: Path) -> str:
    """Copy `src` to `dst` atomically and return the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, atomic_writer(dst) as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below `root`, before the rename that publishes it."""
    for folder, _dirs, names in os.walk(root):
        for name in names:
            with open(Path(folder) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(folder))


class StateLock:
    """`state/lock`, held with flock: the OS releases it when the holder dies, even by SIGKILL."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only or foreign state: say so, nothing changed
            raise UsageError(
                f"{self.path}: cannot take the state lock ({exc.strerror}); this command writes "
                "the state"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                holder = self.holder()
                who = f" (pid {holder})" if holder else ""
                raise UsageError(
                    f"{self.path}: another lora-service daemon is running on this state "
                    f"folder{who}; stop it first"
                ) from None
            raise
        pid = f"{os.getpid()}\n".encode()
        with suppress(OSError):  # over the old bytes first: a full disk still gets the pid
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        self._fd = fd
        return self

    def holder(self) -> int | None:
        """The pid written by the current holder, or None when nobody holds the lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                text = self.path.read_text().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
