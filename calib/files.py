"""Files, one implementation for every floor: atomic writes (of a file, or of a whole new directory), content
fingerprints, the regular-file check.

A file that a reader may see is written to a temporary sibling (same directory, so the rename is atomic),
flushed and fsynced, renamed into place, and its directory fsynced: a reader sees the old complete file
or the new complete one, after a kill and after a power cut. Files are created with ``open(…, "xb")``, so
their mode follows the process umask (``0644`` under the usual ``022``), as any other file the user writes;
``tempfile.mkstemp`` would make them ``0600`` and unreadable to a server running as another user.

What a path *is* is asked in one place, :func:`file_kind`. A reader refuses anything but a regular file (a
FIFO would block it forever). An output may only be a new name or, with ``overwrite``, an existing regular
file (:func:`check_output_file`): a rename over a device node, a FIFO or a symlink would replace it with a
regular file (``--json /dev/null`` run as root did), so those are refused, and :func:`replace_with` checks
again at the rename itself. Standard output is ``-`` in the command line, never ``/dev/stdout``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from disalign.calib.errors import DisalignError, InputError

FINGERPRINT_BLOCK = 1 << 20  # bytes read at a time when hashing


_KINDS = ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(path: str | os.PathLike, *, follow_symlinks: bool = True) -> str | None:
    """None for a regular file, else what ``path`` is: ``"a FIFO"``, ``"a directory"``, ``"a character device"`` …
    (``"a symlink"`` with ``follow_symlinks=False``). Raises FileNotFoundError when nothing is there."""
    return kind_of_mode(os.stat(path, follow_symlinks=follow_symlinks).st_mode)


def kind_of_mode(mode: int) -> str | None:
    """None for a regular file's ``st_mode``, else what it is: ``a FIFO``, ``a directory``, ``a character device`` …"""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def check_output_file(path: str | os.PathLike, field: str, *, overwrite: bool) -> None:
    """Raise :class:`InputError` unless ``path`` may become an output file: nothing is there yet, or a regular
    file is (and ``overwrite``). ``field`` names the path in the sentence (``--json``)."""
    try:
        kind = file_kind(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):  # a new name (a parent that is a file: the caller's parent check)
        return
    if kind == "a directory":
        raise InputError(f"{field} {path} is a directory; expected a file name.")
    if kind is not None:
        raise InputError(f"{field} {path} is {kind}; expected a regular file or a new name (use - for standard output).")
    if not overwrite:
        raise InputError(f"{field} {path} already exists; pass --overwrite to replace it.")


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
    """Move a complete, closed ``temporary`` file over ``path``: fsync it, rename, fsync the directory.

    ``path`` must be a new name or a regular file (:func:`check_output_file`, checked again here, at the rename).
    """
    check_output_file(path, "output", overwrite=True)
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


def check_new_directory(path: str | os.PathLike, role: str) -> None:
    """Refuse, with one sentence and before any work, a ``path`` that :func:`write_directory_atomic` could
    not create: allowed are a path that does not exist (its nearest existing parent a writable directory)
    and an empty directory; a file, a directory with anything in it and an unwritable parent are refused."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise InputError(f"{role} {path} is a dangling symlink; give a new or empty directory.")
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{role} {path} is an existing file; give a new or empty directory.")
        entries = sorted(os.listdir(path))
        if entries:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise InputError(f"{role} {path} is not empty ({shown}); give a new or empty directory (nothing in it is replaced).")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{role} {path} cannot be created: {parent} is not a writable directory.")


def write_directory_atomic(path: str | os.PathLike, build: Callable[[Path], object], role: str = "output directory") -> Path:
    """Create the directory ``path`` (new, or empty) whole: ``build(staging)`` fills a hidden sibling
    ``.NAME.<8 hex>.tmp``, every file and folder in it is fsynced, and one ``rename()`` puts it in place (over
    an empty directory too). A reader sees no directory or the complete one; on any failure the staging
    directory is removed and ``path`` is untouched. ``build`` must not write outside ``staging``.
    """
    path = Path(path)
    check_new_directory(path, role)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_sibling(path)
    os.mkdir(staging)
    try:
        build(staging)
        fsync_tree(staging)
        os.replace(staging, path)  # rename(2): replaces an empty directory, fails on a non-empty one
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(path.absolute().parent)
    return path


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root`` (deepest first), ``root`` included."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)
# -- reading a file that must be a regular one ----------------------------------------------------------------
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
