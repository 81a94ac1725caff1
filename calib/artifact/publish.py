"""Publishing a calibration directory: versioned sub-directories and one atomically replaced pointer.

A calibration path ``DIR`` is a stable directory that publishing never renames or deletes, so it can be
a mount point or a bind mount (a container sees every new version through the same mount)::

    DIR/current -> versions/<id>                 relative symlink: what DIR serves now
    DIR/versions/<id>/calibration.json
    DIR/versions/<id>/parameters.safetensors

:func:`publish` writes the files into ``DIR/versions/.tmp-<rand>/`` (each file and the directory fsynced),
renames that to ``DIR/versions/<id>``, makes a temporary symlink and ``rename()``s it over
``DIR/current`` (the one atomic switch), fsyncs ``DIR``, and only then removes old versions (it keeps
the newest :data:`KEEP_VERSIONS`, the current one and the one it replaced). Killed at any point, it
leaves ``DIR`` serving the old or the new complete artifact, plus at worst some hidden temporary entries
that a later publish removes.

Readers call :func:`artifact_dir` once and read both files from the directory it returns; if a file
vanished in between (a version removed by a publish), they resolve again. :func:`current_version` is
the cheap check (one ``readlink``) a server polls to notice a new version.

The old flat layout (the two files directly in ``DIR``) still loads. Publishing into it converts it:
``current`` is created (readers prefer it from then on), and only after that are the flat files removed.
Only files that are an artifact are ever removed: both present, regular, ``calibration.json`` a JSON object
with ``method``, ``num_classes`` and ``artifact_version``, ``parameters.safetensors`` with a readable
safetensors header. A user's notes named ``calibration.json`` are refused, as are a ``current`` that is
not a link to ``versions/<id>`` and a ``versions`` that is not a directory (:func:`check_publish_target`).

Files are written with the process umask (``0644`` under the usual ``022``), so a server running as
another user can read an artifact fitted on the host. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import struct
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from disalign.calib.errors import ArtifactError
from disalign.calib.files import file_kind, fsync_dir, write_new

METADATA_FILE = "calibration.json"
PARAMETERS_FILE = "parameters.safetensors"
ARTIFACT_FILES = (METADATA_FILE, PARAMETERS_FILE)
CURRENT = "current"
VERSIONS = "versions"
KEEP_VERSIONS = 3
VERSION_TEMP_PREFIX = ".tmp-"  # in DIR/versions/
LINK_TEMP_PREFIX = ".current.tmp-"  # in DIR
FLAT_IDENTITY_KEYS = ("method", "num_classes", "artifact_version")  # what makes a flat calibration.json ours
MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; safetensors' own limit
STALE_TEMP_S = 3600.0  # a temporary entry this old belongs to a killed writer, not a concurrent one
PRIOR_DIR = "prior"  # DIR/prior: the deployment's class prior, published beside the calibration (priors.py)
VERSION_ID = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}")


def artifact_dir(directory: str | os.PathLike) -> Path:
    """The directory that holds the two files of the artifact ``directory`` serves now.

    ``DIR/versions/<id>`` through ``DIR/current``, or ``DIR`` itself for the old flat layout; raises
    :class:`ArtifactError` when ``directory`` holds neither.
    """
    directory = Path(directory)
    target = _pointer(directory)
    if target is not None:
        return directory / target
    if all((directory / name).is_file() for name in ARTIFACT_FILES):
        return directory
    raise ArtifactError(f"{directory} is not a calibration directory: expected {CURRENT} -> {VERSIONS}/<id> "
                        f"(or {METADATA_FILE} and {PARAMETERS_FILE}).")


def current_version(directory: str | os.PathLike) -> str | None:
    """What ``directory`` serves now, cheaply: ``versions/<id>`` (one readlink), a stat signature of the flat
    files for the old layout, or None when it holds no calibration. Changes whenever a new version is published."""
    directory = Path(directory)
    try:
        target = _pointer(directory)
    except ArtifactError:
        return None
    if target is not None:
        return target
    try:
        stats = [os.stat(directory / name) for name in ARTIFACT_FILES]
    except OSError:
        return None
    return "flat:" + ":".join(f"{s.st_ino}-{s.st_mtime_ns}-{s.st_size}" for s in stats)


def check_publish_target(directory: str | os.PathLike, *, role: str = "calibration directory", overwrite: bool = True) -> None:
    """Refuse, with one sentence and before any work, a target that publishing could damage.

    Allowed: a path that does not exist yet (its nearest existing parent must be a writable directory), an
    empty directory, or a directory that holds only a calibration (published or flat). Refused: a file,
    a directory with anything else in it (nothing of it is ever deleted), entries with our names that are
    not ours (:func:`_check_own_names`), an unwritable directory.
    """
    directory = Path(directory)
    if not directory.exists():
        if directory.is_symlink():
            raise ArtifactError(f"{role} {directory} is a dangling symlink; give a directory.")
        parent = _nearest_existing(directory)
        if not parent.is_dir():
            raise ArtifactError(f"{role} {directory} cannot be created: {parent} is not a directory.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ArtifactError(f"{role} {directory} cannot be created: {parent} is not writable.")
        return
    if not directory.is_dir():
        raise ArtifactError(f"{role} {directory} is an existing file, not a calibration directory; "
                            "give a new or empty directory, or one that holds a calibration.")
    others = sorted(name for name in os.listdir(directory) if not _is_ours(name))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ArtifactError(f"{role} {directory} holds files that are not a calibration ({shown}); "
                            "give a new or empty directory, or one that holds a calibration.")
    _check_own_names(directory, role)
    if not overwrite and current_version(directory) is not None:
        raise ArtifactError(f"{role} {directory} already holds a calibration.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ArtifactError(f"{role} {directory} is not writable.")


def publish(directory: str | os.PathLike, files: dict[str, bytes], *, overwrite: bool = True,
            keep: int = KEEP_VERSIONS) -> Path:
    """Publish ``files`` (name → bytes) as the new version of ``directory``; returns ``DIR/versions/<id>``.

    Every step that can fail comes before the switch of ``current``; see the module docstring.
    """
    directory = Path(directory)
    check_publish_target(directory, overwrite=overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    versions = directory / VERSIONS
    versions.mkdir(exist_ok=True)
    previous = _pointer(directory)
    flat = previous is None and any((directory / name).is_file() for name in ARTIFACT_FILES)

    staging = versions / f"{VERSION_TEMP_PREFIX}{secrets.token_hex(6)}"
    os.mkdir(staging)
    try:
        for name, data in files.items():
            write_new(staging / name, data)
        fsync_dir(staging)
        version = _rename_to_new_version(staging, versions)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(versions)

    link = directory / f"{LINK_TEMP_PREFIX}{secrets.token_hex(6)}"
    os.symlink(f"{VERSIONS}/{version}", link)
    try:
        os.replace(link, directory / CURRENT)  # the switch: readers see the old or the new version
    except BaseException:
        link.unlink(missing_ok=True)
        raise
    fsync_dir(directory)

    if flat:  # the flat files are no longer read (current wins); readers that resolved them retry
        for name in ARTIFACT_FILES:
            (directory / name).unlink(missing_ok=True)
        fsync_dir(directory)
    protected = {version} | ({PurePosixPath(previous).name} if previous else set())
    collect_garbage(directory, keep=keep, protected=protected)
    return versions / version


def collect_garbage(directory: Path, *, keep: int = KEEP_VERSIONS, protected: frozenset[str] | set[str] = frozenset()) -> None:
    """Remove versions beyond the newest ``keep`` (never the current or a ``protected`` one) and stale temporaries.

    Only entries whose names this module makes are ever removed.
    """
    versions = directory / VERSIONS
    current = _pointer(directory)
    keep_names = set(protected) | ({PurePosixPath(current).name} if current else set())
    names = sorted(name for name in os.listdir(versions) if VERSION_ID.fullmatch(name))
    keep_names.update(names[-keep:] if keep > 0 else [])
    for name in names:
        if name not in keep_names:
            shutil.rmtree(versions / name, ignore_errors=True)
    now = time.time()
    for name in os.listdir(versions):
        if name.startswith(VERSION_TEMP_PREFIX) and _age(versions / name, now) > STALE_TEMP_S:
            shutil.rmtree(versions / name, ignore_errors=True)
    for name in os.listdir(directory):
        if name.startswith(LINK_TEMP_PREFIX) and _age(directory / name, now) > STALE_TEMP_S:
            (directory / name).unlink(missing_ok=True)


# -- helpers ----------------------------------------------------------------------------------------
def _check_own_names(directory: Path, role: str) -> None:
    """Raise unless what carries our names in ``directory`` is ours: ``current`` a link to ``versions/<id>``,
    ``versions`` a directory (not a link), and flat files (without ``current``) an artifact."""
    if os.path.lexists(directory / CURRENT):
        try:
            _pointer(directory)  # a file, a directory, or a link anywhere but versions/<id>
        except ArtifactError as exc:
            raise ArtifactError(f"{role} {directory}: {exc}") from None
    versions = directory / VERSIONS
    if os.path.lexists(versions):
        kind = file_kind(versions, follow_symlinks=False)
        if kind != "a directory":
            raise ArtifactError(f"{role} {directory}: {versions} should be a directory of versions, found {kind or 'a file'}; it is not replaced: "
                                "move it away or give another directory.")
    present = [name for name in ARTIFACT_FILES if os.path.lexists(directory / name)]
    if not present or os.path.lexists(directory / CURRENT):
        return  # with current, the flat files are never read, and a publish does not remove them
    for name in present:
        kind = file_kind(directory / name, follow_symlinks=False)
        if kind is not None:
            raise ArtifactError(f"{role} {directory}: {directory / name} is {kind}; a calibration's files are regular files, "
                                "so it is not replaced; move it away or give another directory.")
    if len(present) == 1:
        missing = next(name for name in ARTIFACT_FILES if name not in present)
        raise ArtifactError(f"{role} {directory} holds {present[0]} without {missing}, so it is not a calibration and is not "
                            "replaced; move it away or give another directory.")
    why = _not_an_artifact(directory)
    if why:
        raise ArtifactError(f"{role} {directory}: {why}, so the two files are not replaced; move them away or give another directory.")


def _not_an_artifact(directory: Path) -> str:
    """Why the flat files in ``directory`` are not a calibration artifact ('' when they are one): the identity
    of ``calibration.json`` and the header of ``parameters.safetensors`` (their full checks are
    :mod:`disalign.calib.artifact.format`'s, on load)."""
    meta = directory / METADATA_FILE
    try:
        raw = json.loads(meta.read_bytes())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply to be ours
        raw = None
    if not isinstance(raw, dict):
        return f"{meta} is not a calibration artifact's metadata (not a JSON object)"
    missing = [key for key in FLAT_IDENTITY_KEYS if key not in raw]
    if missing:
        return f"{meta} is not a calibration artifact's metadata (no {', '.join(repr(k) for k in missing)})"
    parameters = directory / PARAMETERS_FILE
    with open(parameters, "rb") as fh:
        head = fh.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        body = fh.read(size) if 0 < size <= MAX_SAFETENSORS_HEADER else b""
    try:
        header = json.loads(body) if len(body) == size else None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        return f"{parameters} is not a safetensors file (no readable header)"
    return ""


def _pointer(directory: Path) -> str | None:
    """The target of ``DIR/current`` (``versions/<id>``), None when there is no such link."""
    link = directory / CURRENT
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if link.exists():
            raise ArtifactError(f"{link} should be a symlink to {VERSIONS}/<id>, found a {'directory' if link.is_dir() else 'file'} "
                                "(copy calibration directories with their symlinks, e.g. cp -a).") from exc
        return None
    parts = PurePosixPath(target).parts
    if len(parts) != 2 or parts[0] != VERSIONS or parts[1] in (".", "..") or parts[1].startswith("."):
        raise ArtifactError(f"{link} should point to {VERSIONS}/<id> (a relative path), found {target!r}.")
    return target


def _is_ours(name: str) -> bool:
    # PRIOR_DIR: the deployment's published class prior, next to the calibration (disalign.calib.artifact.priors)
    return name in (CURRENT, VERSIONS, PRIOR_DIR, *ARTIFACT_FILES) or name.startswith(LINK_TEMP_PREFIX)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _rename_to_new_version(staging: Path, versions: Path) -> str:
    """Rename the staging directory to a new, time-ordered version id (never over an existing one)."""
    for _attempt in range(5):
        version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ") + f"-{secrets.token_hex(3)}"
        if not (versions / version).exists():
            os.rename(staging, versions / version)  # on Linux, rename onto an existing non-empty directory fails
            return version
    raise ArtifactError(f"could not find a free version name in {versions}.")


def _age(path: Path, now: float) -> float:
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return 0.0
