"""Files in and out: every read is bounded by its format, every write is atomic.

``read_bounded`` is how stampline reads any file: the bound comes from the file's format (each
format names its own, e.g. ``recipe.MAX_RECIPE_BYTES``), a larger file is refused in one sentence
before it is read, and only regular files are read (a device such as /dev/zero, a FIFO or a
directory is refused). ``write_atomically`` leaves the old content or the new, never a torn one.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

from stampline.errors import StamplineError, UsageError, shown

KiB = 1024
MiB = 1024 * KiB
_CHUNK = 1 * MiB


def size_text(size: int) -> str:
    """``65536`` as "64 KiB", ``16777216`` as "16 MiB"."""
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def _too_large(what: str, path: str, limit: int) -> UsageError:
    article = "an" if what[:1].lower() in "aeiou" else "a"
    return UsageError(f"the {what} {path} is larger than {size_text(limit)}; {article} {what} is at most "
                      f"{size_text(limit)}.")


def read_bounded(path: str | os.PathLike[str], limit: int, what: str, stdin: bool = False) -> bytes:
    """The content of the regular file ``path`` (``what``, e.g. "recipe", names it in errors),
    refused in one sentence when larger than ``limit`` bytes. ``stdin`` lets "-" mean standard
    input (read to the same bound). The size reported by the file system is checked first, and
    the read stops at ``limit + 1`` bytes whatever it said (/proc files report 0)."""
    name = shown(str(path), 160)
    if stdin and str(path) == "-":
        data = sys.stdin.buffer.read(limit + 1)
        if len(data) > limit:
            raise _too_large(what, "on standard input", limit)
        return data
    try:
        kind = os.stat(path).st_mode  # before opening: opening a device (a serial port) can act on it
        if stat.S_ISDIR(kind):
            raise UsageError(f"the {what} {name} is a directory, not a file.")
        if not stat.S_ISREG(kind):
            raise UsageError(f"the {what} {name} is not a regular file.")
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb", buffering=0) as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):  # replaced since the stat
                raise UsageError(f"the {what} {name} is not a regular file.")
            if info.st_size > limit:
                raise _too_large(what, name, limit)
            chunks: list[bytes] = []
            total, want = 0, info.st_size + 1  # the whole file at once, as a rule
            while total <= limit:
                chunk = f.read(min(max(want, _CHUNK), limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {name}: {exc.strerror or exc}.") from None
    if total > limit:
        raise _too_large(what, name, limit)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def decode_text(data: bytes, where: str) -> str:
    """``data`` as strict UTF-8; otherwise one sentence naming ``where`` and the line of the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(f"{where} is not UTF-8 text: line {line} holds a byte that is not UTF-8.") from None


def read_text_bounded(path: str | os.PathLike[str], limit: int, what: str) -> str:
    """``read_bounded``, decoded as strict UTF-8."""
    return decode_text(read_bounded(path, limit, what), f"the {what} {shown(str(path), 160)}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """All or nothing: a temporary file in the same directory (created with ``mode``), fsynced,
    renamed over ``path``, the directory fsynced."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise StamplineError(f"cannot write {path}: {exc.strerror or exc}.") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(directory)
