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

Files are written with the process umask (``0644`` under the usual ``022``), so a server running as
another user can read an artifact fitted on the host. Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from disalign.calib.errors import ArtifactError
from disalign.calib.files import fsync_dir, write_new

METADATA_FILE = "calibration.json"
PARAMETERS_FILE = "parameters.safetensors"
ARTIFACT_FILES = (METADATA_FILE, PARAMETERS_FILE)
CURRENT = "current"
VERSIONS = "versions"
KEEP_VERSIONS = 3
VERSION_TEMP_PREFIX = ".tmp-"  # in DIR/versions/
LINK_TEMP_PREFIX = ".current.tmp-"  # in DIR
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
    a directory with anything else in it (nothing of it is ever deleted), an unwritable directory.
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
