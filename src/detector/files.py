"""Small file utilities every part shares: atomic writes, file modes, how paths and errors
are shown to the user, file hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# The mode open() would give a new file under this process's umask.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


FILE_MODE = 0o666 & ~_UMASK


def display(path: str | os.PathLike) -> str:
    """A printable form of a path whose bytes may not be UTF-8 (names from other systems)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", durable: bool = False) -> Iterator[IO]:
    """A file object whose content replaces ``path`` only once the block ends without error.

    Written to a temporary file beside ``path`` and renamed over it (``os.replace`` is atomic
    on one file system): a reader sees the old file or the new one, never half of one, and a
    failure (full disk, kill -9) leaves the old one in place. ``durable``: also fsync the file
    and its folder, so that a power cut right after cannot undo the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` into ``path`` through :func:`atomic_file`: readers never see half a file."""
    with atomic_file(path) as f:
        f.write(text)


def file_hash(path: str | Path, length: int = 12) -> str:
    """The model id written next to every prediction: two runs with the same id used the same
    weights, whatever the checkpoint file was renamed to."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def first_line(e: BaseException) -> str:
    """An exception as one line for an ``error:`` message (libraries' messages run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_error(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
