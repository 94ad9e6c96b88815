"""Per-file checks of an inbox image: what Pillow may read, and how far.

The order is what makes it safe:
1. The file is opened with `O_NOFOLLOW | O_NONBLOCK` (relative to the batch folder's descriptor
   when the intake passes `dir_fd`, so a folder swapped for a symlink cannot redirect the read)
   and fstat'ed: a symlink is never followed, and a FIFO or device is refused without blocking
   (only regular files are read).
2. Pillow parses the header only, restricted to the formats of the allowed extensions (a `.png`
   that is really an EPS never reaches Ghostscript), and the pixel count is checked against
   `inbox.max_image_pixels` before anything is decoded: a decompression bomb is refused unread.
3. The bytes are read once, hashed, and decoded completely (`Image.load()`), so a truncated file
   fails here and not in training; the very same bytes are what the store receives, so nothing
   can change between the check and the copy. At most the fstat size + 1 bytes are read, and a
   different count (a file grown or cut after fstat) is a bad file: the size limit holds for
   what is read and stored, not only for what fstat said.

Animated and multi-page images (APNG, animated WebP) are rejected, not cut to their first frame:
which frame the caption describes is a guess, and a silent guess would train on data the user
did not mean ("raise a concise error rather than silently correct"). The one exception is a
JPEG in the MPO layout (what many phones and 3D cameras write: a primary image plus depth or
preview frames): the standard makes the first frame the photo itself, so it is accepted and
Pillow's default (first frame) is what training reads.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# PNG and JPEG files can grow well past w*h*channels with metadata; this only bounds memory.
MAX_BYTES_PER_PIXEL = 8
MIN_FILE_BYTES_LIMIT = 16 << 20


@dataclass(frozen=True)
class Checked:
    """The verdict on one image file: `reason` is None when it is good."""

    name: str
    reason: str | None = None
    sha256: str | None = None
    width: int = 0
    height: int = 0
    format: str | None = None


@dataclass(frozen=True)
class Limits:
    formats: tuple[str, ...]  # Pillow format ids, e.g. ("BMP", "JPEG", "PNG", "WEBP")
    min_side: int
    max_pixels: int


def allowed_formats(extensions: tuple[str, ...]) -> tuple[str, ...]:
    """Pillow format ids for the configured extensions (`png` -> `PNG`, `jpg` -> `JPEG`)."""
    registered = Image.registered_extensions()
    return tuple(sorted({registered[f".{ext}"] for ext in extensions if f".{ext}" in registered}))


def _too_big(width: int, height: int, limits: Limits) -> str | None:
    if width * height > limits.max_pixels:
        return (
            f"{width}x{height} = {width * height} pixels, over inbox.max_image_pixels = "
            f"{limits.max_pixels} (not decoded)"
        )
    return None


def check_image(
    path: str | Path, limits: Limits, copy_to: Path | None = None, *, dir_fd: int | None = None
) -> Checked:
    """Check one image file (relative to `dir_fd` when given); when good and `copy_to` is set,
    write its bytes there (fsynced).

    Never raises for a bad file: every failure is a `Checked` with the reason to journal.
    """
    name = os.path.basename(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Checked(name, "symlink (not followed)")
        return Checked(name, f"cannot be read ({exc.strerror})")
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            return Checked(name, "not a regular file")
        # 1. header only: identify the format and refuse bombs before reading the rest
        try:
            with Image.open(fh, formats=limits.formats) as head:
                width, height = head.size
        except UnidentifiedImageError:
            return Checked(name, f"not an image (none of {', '.join(limits.formats)})")
        except Image.DecompressionBombError as exc:
            return Checked(name, f"decompression bomb refused, not decoded ({exc})")
        except Exception as exc:  # Pillow raises many types on hostile headers
            return Checked(name, f"truncated or corrupt image header ({type(exc).__name__}: {exc})")
        if reason := _too_big(width, height, limits):
            return Checked(name, reason, width=width, height=height)
        limit = max(MIN_FILE_BYTES_LIMIT, limits.max_pixels * MAX_BYTES_PER_PIXEL)
        if info.st_size > limit:
            return Checked(name, f"file of {info.st_size} bytes is too large for its limits")
        fh.seek(0)
        data = fh.read(info.st_size + 1)  # bounded: a file growing behind fstat is not read on
    if len(data) != info.st_size:
        return Checked(name, f"file changed while read ({info.st_size} bytes when opened); "
                             "drop it again once it is complete")
    # 2. full decode of exactly the bytes that will be stored
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data), formats=limits.formats) as image:
            width, height = image.size
            fmt = image.format
            if reason := _too_big(width, height, limits):
                return Checked(name, reason, sha, width, height, fmt)
            frames = getattr(image, "n_frames", 1)
            if frames > 1 and fmt != "MPO":
                return Checked(
                    name,
                    f"animated or multi-page image ({frames} frames): drop a still image",
                    sha, width, height, fmt,
                )
            image.load()
    except UnidentifiedImageError:
        return Checked(name, f"not an image (none of {', '.join(limits.formats)})", sha)
    except Image.DecompressionBombError as exc:
        return Checked(name, f"decompression bomb refused, not decoded ({exc})", sha)
    except Exception as exc:  # truncated data, bad CRC, broken codec streams
        return Checked(name, f"truncated or corrupt image ({type(exc).__name__}: {exc})", sha)
    if min(width, height) < limits.min_side:
        return Checked(
            name,
            f"too small: {width}x{height}, inbox.min_image_side = {limits.min_side}",
            sha, width, height, fmt,
        )
    if copy_to is not None:
        write_synced(copy_to, data)
    return Checked(name, None, sha, width, height, fmt)


def write_synced(path: Path, data: bytes) -> None:
    """Create `path` (never over an existing file) with `data`, fsynced. Used inside a temp
    folder that is itself renamed into place, so no per-file rename is needed."""
    with open(path, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
