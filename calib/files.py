"""Files, one implementation for every floor: atomic writes, content fingerprints, the regular-file check.

A file that a reader may see is written to a temporary sibling (same directory, so the rename is atomic),
flushed and fsynced, renamed into place, and its directory fsynced: a reader sees the old complete file
or the new complete one, after a kill and after a power cut. Files are created with ``open(…, "xb")``, so
their mode follows the process umask (``0644`` under the usual ``022``), as any other file the user writes;
``tempfile.mkstemp`` would make them ``0600`` and unreadable to a server running as another user.
"""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from disalign.calib.errors import DisalignError

FINGERPRINT_BLOCK = 1 << 20  # bytes read at a time when hashing


def temporary_sibling(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A unique hidden name next to ``path`` (``.NAME.<8 hex>SUFFIX``; same directory, so a rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: str | os.PathLike, data: bytes) -> None:
    """Create ``path`` (never over an existing file; mode from the umask) holding ``data``, fsynced."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace_with(temporary: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move a complete, closed ``temporary`` file over ``path``: fsync it, rename, fsync the directory."""
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    fsync_dir(Path(path).absolute().parent)
    return Path(path)


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, or a function that writes into the open file) to ``path`` atomically.

    Parents are created. On any failure the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        with open(temporary, "xb") as fh:
            if isinstance(data, bytes | bytearray | memoryview):
                fh.write(data)
            else:
                data(fh)
        return replace_with(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def file_fingerprint(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(FINGERPRINT_BLOCK), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


# -- reading a file that must be a regular one ----------------------------------------------------------------
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def kind_of_mode(mode: int) -> str | None:
    """None for a regular file's ``st_mode``, else what it is: ``a FIFO``, ``a directory``, ``a character device`` …"""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def read_regular_file(path: str | os.PathLike, error: type[DisalignError], *, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file (a link to one is followed); else ``error`` with
    one sentence. Never blocks on what is not a file: it is opened non-blocking (a FIFO with no writer opens
    at once instead of waiting for one) and checked on the open descriptor (no race with a rename) before a
    byte is read, so neither a FIFO nor a device such as ``/dev/zero`` can hold the reader.

    Raises FileNotFoundError as ``open`` does (callers that retry on a vanished file rely on it).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        kind = kind_of_mode(info.st_mode)
        if kind is not None:
            raise error(f"{path} should be a regular file, found {kind}.")
        if max_bytes is not None and info.st_size > max_bytes:
            raise error(f"{path} has {info.st_size} bytes; at most {max_bytes} are expected of it.")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)
