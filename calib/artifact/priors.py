"""The deployment's class prior, published next to its calibration: versions, the trusted traffic behind them, a lock.

The prior a deployment serves is state of the deployment, not of one server process: it is published here
as versions, exactly as calibrations are (:func:`disalign.calib.artifact.publish.publish`: a version
directory written and fsynced, then one ``rename`` of the ``current`` symlink), and every replica serves
the version ``current`` points to, noticed by the same one-``readlink`` poll as a new calibration::

    DIR/prior/published/current -> versions/<id>     the prior every replica serves (publish.py's layout)
    DIR/prior/published/versions/<id>/prior.json     one :class:`PriorVersion`
    DIR/prior/traffic/<replica>.safetensors          each replica's window of trusted rows, by source
    DIR/prior/estimate.lock                          held (flock) by the one process estimating or publishing

``prior.json`` is also a prior file (``{"prior": [K], "classes": [K], ...}``, what ``DISALIGN_PRIOR=<file>``
and ``eval --target-prior`` read), except for a balanced version, whose ``prior`` is null. A version names
the calibration it was estimated with (``calibration_version``, :func:`calibration_version`); a server
serving another calibration serves it balanced. ``epoch`` changes only with a reset: traffic collected
under an older epoch is never pooled again.

Who writes here: a server that takes trusted traffic (``DISALIGN_PRIOR_SOURCES``) writes its window, and
the estimate, made under the lock from every replica's window, is published after the bounded-step and
significance check of :func:`disalign.calib.core.label_shift.next_prior`; ``disalign adapt --publish``
does the same from an offline bank; ``POST /admin/prior`` publishes ``set``, ``freeze`` and ``reset``.
Nothing here decides what to publish: this module stores and reads, strictly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from disalign.calib import json_text
from disalign.calib.artifact.format import error_sentence
from disalign.calib.artifact.publish import PRIOR_DIR, VERSIONS, current_version, publish
from disalign.calib.errors import ArtifactError
from disalign.calib.files import read_regular_file, write_atomic

PUBLISHED = "published"
TRAFFIC = "traffic"
LOCK_FILE = "estimate.lock"
PRIOR_FILE = "prior.json"
FORMAT_VERSION = 1
INITIAL_EPOCH = "initial"  # the epoch of a store no one has reset
KEEP_VERSIONS = 10  # a published prior is small; the newest ten say how it moved
MAX_PRIOR_BYTES = 64 * 2**20
MAX_TRAFFIC_BYTES = 2**31  # one replica's window: rows x K float32 (5000 x 1000 is 20 MB)
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
REPLICA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SOURCES = ("estimate", "adapt", "admin")  # who published a version


@dataclass(frozen=True)
class PriorVersion:
    """``prior.json``: one published prior (module docstring); checked strictly on read (:func:`check_version`)."""

    prior: list[StrictFloat] | None  # (K,) summing to 1; None: balanced
    classes: list[StrictStr]
    calibration_version: Annotated[StrictStr, Field(min_length=1)]
    source: Literal["estimate", "adapt", "admin"]
    epoch: Annotated[StrictStr, Field(min_length=1)]
    created: StrictStr
    frozen: StrictBool = False  # set by an admin: no estimate replaces it until unfrozen
    rows: Annotated[StrictInt, Field(ge=0)] = 0  # trusted rows behind the estimate
    rows_by_source: dict[StrictStr, Annotated[StrictInt, Field(ge=0)]] = field(default_factory=dict)
    test: dict[str, Any] | None = None  # the decision of label_shift.next_prior, for the record
    format_version: Literal[1] = FORMAT_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()



_VERSION = TypeAdapter(PriorVersion)


def prior_digest(prior: np.ndarray, calibration_version: str) -> str:
    """12 hex of a prior (K,) and the calibration it applies to: every replica serving the same published version
    names it alike (``<source>-<12 hex>``)."""
    return hashlib.sha256(np.asarray(prior, dtype=np.float64).tobytes() + calibration_version.encode()).hexdigest()[:12]


def check_version(raw: Any, where: str) -> PriorVersion:
    """A parsed ``prior.json`` → :class:`PriorVersion`; ArtifactError naming the field for anything else."""
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where} should hold a JSON object, found {type(raw).__name__}.")
    known = {f.name for f in fields(PriorVersion)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ArtifactError(f"{where}: unknown key {unknown[0]!r} (prior format {FORMAT_VERSION} has {', '.join(sorted(known))}).")
    try:
        version = _VERSION.validate_python(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{where}: {error_sentence(exc)}") from None
    prior, k = version.prior, len(version.classes)
    if prior is not None:
        if len(prior) != k:
            raise ArtifactError(f"{where}: 'prior' should have one value per class ({k}), found {len(prior)}.")
        if not all(math.isfinite(v) and v >= 0 for v in prior) or not abs(math.fsum(prior) - 1.0) <= 1e-6:
            raise ArtifactError(f"{where}: 'prior' should be {k} finite numbers >= 0 summing to 1, found {prior!r:.80}.")
    return version


def prior_dir(calibration_dir: str | os.PathLike, override: str | os.PathLike | None = None) -> Path:
    """Where a calibration directory's prior lives: ``DIR/prior`` (or ``override``, a writable directory for a
    calibration mounted read-only)."""
    return Path(override) if override is not None else Path(calibration_dir) / PRIOR_DIR


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_epoch() -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


# -- published versions ----------------------------------------------------------------------------------
def pointer(store: str | os.PathLike) -> str | None:
    """What ``store`` serves now, cheaply (one readlink): ``versions/<id>``, None before the first publish."""
    return current_version(Path(store) / PUBLISHED)


def read_current(store: str | os.PathLike) -> tuple[str, PriorVersion] | None:
    """``(pointer, version)`` of the published prior, None when none is published; ArtifactError (one sentence)
    for one that is not a regular file, not JSON, nested too deeply, or not a :class:`PriorVersion`."""
    published = Path(store) / PUBLISHED
    for _attempt in range(3):  # a version removed between readlink and open (a publish collected it): resolve again
        target = current_version(published)
        if target is None:
            return None
        path = published / target / PRIOR_FILE
        try:
            data = read_regular_file(path, ArtifactError, max_bytes=MAX_PRIOR_BYTES)
        except FileNotFoundError:
            continue
        return target, parse_version(data, str(path))
    raise ArtifactError(f"{published}: the current prior version keeps vanishing while it is read.")


def parse_version(data: bytes, where: str) -> PriorVersion:
    try:
        raw = json_text.loads(data, where, ArtifactError)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where} is not valid JSON ({exc}).") from None
    return check_version(raw, where)


def publish_version(store: str | os.PathLike, version: PriorVersion) -> str:
    """Publish ``version`` atomically (publish.py: written, fsynced, then ``current`` renamed) → its pointer
    ``versions/<id>``. Call it holding :func:`estimate_lock`, after reading what it replaces."""
    parse_version(version.to_json(), "the prior version")  # never publish what a reader would refuse
    published = Path(store) / PUBLISHED
    directory = publish(published, {PRIOR_FILE: version.to_json()}, keep=KEEP_VERSIONS)
    return f"{VERSIONS}/{directory.name}"


# -- every replica's trusted traffic ------------------------------------------------------------------------
def replica_name() -> str:
    """A name for this process's traffic file: host, pid and a random part (a restarted pid is another replica)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def write_traffic(store: str | os.PathLike, replica: str, *, epoch: str, calibration_version: str,
                  windows: dict[str, np.ndarray]) -> Path:
    """Write one replica's window (source → rows (n, K) float32 of balanced probabilities), atomically."""
    if not REPLICA_NAME.fullmatch(replica):
        raise ArtifactError(f"replica name should match {REPLICA_NAME.pattern}, found {replica!r:.80}.")
    tensors = {f"source/{name}": torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)) for name, rows in windows.items()}
    metadata = {"epoch": epoch, "calibration_version": calibration_version, "replica": replica, "time": repr(time.time())}
    path = Path(store) / TRAFFIC / f"{replica}.safetensors"
    write_atomic(path, save_tensors(tensors, metadata=metadata))
    return path


def remove_traffic(store: str | os.PathLike, replica: str) -> None:
    with contextlib.suppress(OSError):
        (Path(store) / TRAFFIC / f"{replica}.safetensors").unlink()


def clear_traffic(store: str | os.PathLike) -> None:
    """Remove every replica's traffic file (a reset: none of it counts again)."""
    directory = Path(store) / TRAFFIC
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(directory):
            if entry.endswith(".safetensors"):
                with contextlib.suppress(OSError):
                    (directory / entry).unlink()


def read_traffic(store: str | os.PathLike, *, epoch: str, calibration_version: str, num_classes: int,
                 max_age_s: float) -> tuple[dict[str, list[np.ndarray]], list[str]]:
    """Every replica's window collected under ``epoch`` for ``calibration_version`` and written in the last
    ``max_age_s`` seconds → (source → its rows, one array per replica; the sentences of the files skipped).

    A file that is not one of ours (not a regular file, not safetensors, rows of another K) is skipped with
    its sentence, never trusted: only servers holding the sources' tokens write here.
    """
    directory = Path(store) / TRAFFIC
    pooled: dict[str, list[np.ndarray]] = {}
    skipped: list[str] = []
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return pooled, skipped
    now = time.time()
    for entry in entries:
        if not entry.endswith(".safetensors") or entry.startswith("."):
            continue
        path = directory / entry
        try:
            if now - os.stat(path).st_mtime > max_age_s:
                continue  # a replica gone (or idle) for a while: its window is stale
            data = read_regular_file(path, ArtifactError, max_bytes=MAX_TRAFFIC_BYTES)
            metadata, tensors = _traffic_contents(data, str(path))
        except FileNotFoundError:
            continue  # removed meanwhile (a replica shutting down)
        except ArtifactError as exc:
            skipped.append(str(exc))
            continue
        if metadata.get("epoch") != epoch or metadata.get("calibration_version") != calibration_version:
            continue
        for key, rows in tensors.items():
            name = key.removeprefix("source/")
            if not key.startswith("source/") or not SOURCE_NAME.fullmatch(name) or rows.ndim != 2 or rows.shape[1] != num_classes:
                skipped.append(f"{path}: tensor {key!r} is not a window of rows of K={num_classes} classes.")
                continue
            pooled.setdefault(name, []).append(rows)
    return pooled, skipped


def _traffic_contents(data: bytes, where: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and tensors of a safetensors file: 8 bytes of header length, the JSON header (with its
    ``__metadata__``), the tensors' bytes."""
    try:
        length = int.from_bytes(data[:8], "little")
        if len(data) < 8 or length > len(data) - 8:
            raise ValueError("the header runs past the end of the file")
        header = json_text.loads(data[8:8 + length], f"{where}: the header", ArtifactError)
        metadata = header.get("__metadata__") or {} if isinstance(header, dict) else {}
        tensors = load_tensors(data)
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors' and json's own error types
        raise ArtifactError(f"{where} is not a readable safetensors file ({exc}).") from None
    out = {}
    for key, tensor in tensors.items():
        if tensor.dtype != torch.float32 or not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{where}: tensor {key!r} should be finite float32 rows.")
        out[key] = tensor.numpy()
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}, out


# -- one estimator at a time -----------------------------------------------------------------------------
@contextlib.contextmanager
def estimate_lock(store: str | os.PathLike, *, wait_s: float = 0.0) -> Iterator[bool]:
    """Hold ``store``'s lock (``flock``, released when the process dies) → True, or False if another process
    holds it for longer than ``wait_s`` seconds. Whoever holds it reads the current version, decides and
    publishes: two replicas never publish from the same stale version."""
    path = Path(store) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.02)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def check_writable(store: str | os.PathLike) -> None:
    """Create the store's directories; ArtifactError (one sentence) when that or writing in them is not possible."""
    store = Path(store)
    try:
        for sub in (PUBLISHED, TRAFFIC):
            (store / sub).mkdir(parents=True, exist_ok=True)
        probe = store / TRAFFIC / f".probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ArtifactError(f"the prior directory {store} is not writable ({exc.strerror or exc}); a server that takes "
                            "trusted traffic (DISALIGN_PRIOR_SOURCES) publishes the deployment's prior there: "
                            "mount it writable or set DISALIGN_PRIOR_DIR.") from None
