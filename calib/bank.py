"""Feature banks: HDF5 files of cached stage-1 outputs (spec: ``docs/bank-format.md``).

One file per split. Rows are samples (images, pixels or RoIs; several augmented views of one image are
several rows). Readers validate the header on open and the values (NaN/inf, label range) while reading,
and can stream row blocks so a bank larger than RAM can be used. :class:`BankWriter` appends row blocks
to a temporary file and renames it into place only when complete, so a half-written bank is never
readable under its final name.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import torch

from calib.errors import BankError

SCHEMA_VERSION = 1
FEATURE_DTYPES = ("float16", "float32")
DEFAULT_CHUNK_ROWS = 1024
# name -> (ndim, allowed dtypes); N is shared by all, d by features, K by logits.
REQUIRED_DATASETS: dict[str, tuple[int, tuple[str, ...]]] = {
    "features": (2, FEATURE_DTYPES),
    "logits": (2, ("float32",)),
    "labels": (1, ("int64",)),
    "sample_index": (1, ("int64",)),
    "view": (1, ("int16",)),
}
TASKS = ("classification", "segmentation", "detection")


@dataclass(frozen=True)
class BankInfo:
    """Header of a bank: everything except the row data."""

    path: str
    num_rows: int
    feature_dim: int
    num_classes: int  # K: width of the logits (K+1 for detection banks, background included)
    feature_dtype: str
    class_names: list[str]
    class_counts: np.ndarray | None  # (K,) int64, per-class counts of the *training* split
    model_fingerprint: str
    preprocessing: dict
    producer: str
    created: str
    num_views: int
    task: str = "classification"
    background_index: int | None = None
    has_classifier: bool = False
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    extra_datasets: tuple[str, ...] = ()


@dataclass
class Bank:
    """A bank loaded into memory. Shapes: features (N, d), logits (N, K), labels/sample_index/view (N,)."""

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    sample_index: torch.Tensor
    view: torch.Tensor
    info: BankInfo
    classifier_weight: torch.Tensor | None = None  # (K, d) float32
    classifier_bias: torch.Tensor | None = None  # (K,) float32
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # optional per-row columns
    skipped: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # list rows not extracted

    @property
    def num_rows(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def training_class_counts(self) -> np.ndarray:
        """Per-class training counts: the ``class_counts`` attribute, else counted from clean-view labels."""
        if self.info.class_counts is not None:
            return self.info.class_counts
        clean = (self.view == 0) & (self.labels >= 0)
        return np.bincount(self.labels[clean].numpy(), minlength=self.num_classes).astype(np.int64)


def _decode_json_attr(attrs, name: str, default, path: str):
    if name not in attrs:
        return default
    raw = attrs[name]
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        return json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise BankError(f"{path}: attribute '{name}' should be JSON text, found {raw!r:.80}.") from exc


class BankReader:
    """Read-only access to one bank file; use as a context manager.

    Opening validates the header (datasets, dtypes, shapes, attributes); :meth:`iter_blocks` and
    :meth:`load` validate values block by block.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not Path(self.path).exists():
            raise BankError(f"bank file {self.path} does not exist.")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise BankError(f"bank file {self.path} is not a readable HDF5 file ({exc}).") from exc
        try:
            self.info = self._read_header()
        except BaseException:
            self._file.close()
            raise

    # -- header -----------------------------------------------------------------------------------
    def _read_header(self) -> BankInfo:
        f, path = self._file, self.path
        if f.attrs.get("complete") is not True and not bool(f.attrs.get("complete", False)):
            raise BankError(f"{path} is not a complete bank (its writer did not finish); re-run the extraction.")
        version = int(f.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise BankError(f"{path}: schema_version should be {SCHEMA_VERSION}, found {version}.")
        for name, (ndim, dtypes) in REQUIRED_DATASETS.items():
            if name not in f:
                raise BankError(f"{path}: required dataset '{name}' is missing.")
            ds = f[name]
            if ds.ndim != ndim:
                raise BankError(f"{path}: dataset '{name}' should have {ndim} dimension(s), found shape {ds.shape}.")
            if ds.dtype.name not in dtypes:
                raise BankError(f"{path}: dataset '{name}' should have dtype {' or '.join(dtypes)}, found {ds.dtype.name}.")
        n = f["logits"].shape[0]
        for name in REQUIRED_DATASETS:
            if f[name].shape[0] != n:
                raise BankError(
                    f"{path}: dataset '{name}' has {f[name].shape[0]} rows but 'logits' has {n}; all datasets need the same N."
                )
        k = f["logits"].shape[1]
        d = f["features"].shape[1]
        if k < 1 or d < 1:
            raise BankError(f"{path}: features/logits need at least one column, found d={d}, K={k}.")
        class_names = _decode_json_attr(f.attrs, "class_names", [str(i) for i in range(k)], path)
        if len(class_names) != k:
            raise BankError(f"{path}: attribute 'class_names' has {len(class_names)} names but the logits have K={k} columns.")
        class_counts = None
        if "class_counts" in f.attrs:
            class_counts = np.asarray(f.attrs["class_counts"], dtype=np.int64).reshape(-1)
            if class_counts.shape[0] != k:
                raise BankError(f"{path}: attribute 'class_counts' has {class_counts.shape[0]} entries, expected K={k}.")
        task = str(f.attrs.get("task", "classification"))
        if task not in TASKS:
            raise BankError(f"{path}: attribute 'task' should be one of {', '.join(TASKS)}, found {task!r}.")
        bg = int(f.attrs.get("background_index", -1))
        has_classifier = "classifier" in f and "weight" in f["classifier"]
        if has_classifier and f["classifier/weight"].shape != (k, d):
            raise BankError(f"{path}: dataset 'classifier/weight' should have shape ({k}, {d}), found {f['classifier/weight'].shape}.")
        chunks = f["logits"].chunks
        # Optional per-row columns (image_id, yx, boxes …); `skipped` and other non-row datasets are not rows.
        extra = tuple(
            sorted(name for name in f if name not in REQUIRED_DATASETS and name != "skipped" and isinstance(f[name], h5py.Dataset)
                   and f[name].ndim >= 1 and f[name].shape[0] == n)
        )
        return BankInfo(
            path=path,
            num_rows=n,
            feature_dim=d,
            num_classes=k,
            feature_dtype=f["features"].dtype.name,
            class_names=[str(c) for c in class_names],
            class_counts=class_counts,
            model_fingerprint=str(f.attrs.get("model_fingerprint", "")),
            preprocessing=_decode_json_attr(f.attrs, "preprocessing", {}, path),
            producer=str(f.attrs.get("producer", "")),
            created=str(f.attrs.get("created", "")),
            num_views=int(f.attrs.get("num_views", 1)),
            task=task,
            background_index=None if bg < 0 else bg,
            has_classifier=has_classifier,
            chunk_rows=int(chunks[0]) if chunks else DEFAULT_CHUNK_ROWS,
            extra_datasets=extra,
        )

    # -- rows -------------------------------------------------------------------------------------
    def column(self, name: str) -> np.ndarray:
        """A whole 1-D dataset (labels, sample_index, view, …) as a numpy array."""
        if name not in self._file:
            raise BankError(f"{self.path}: dataset '{name}' is missing.")
        return self._file[name][...]

    def read_rows(self, start: int, stop: int, *, validate: bool = True) -> dict[str, np.ndarray]:
        """Rows [start, stop) of every required dataset, as numpy arrays."""
        out = {name: self._file[name][start:stop] for name in REQUIRED_DATASETS}
        if validate:
            check_row_values(out, self.info.num_classes, self.path, row_offset=start)
        return out

    def read_rows_into(self, start: int, stop: int, out: dict[str, np.ndarray], *, validate: bool = True) -> None:
        """Rows [start, stop) of the datasets named in ``out`` read straight into its arrays (stop − start rows
        each, C-contiguous; views of larger buffers are fine): no intermediate copy. ``validate`` needs
        features, logits and labels among them."""
        for name, array in out.items():
            self._file[name].read_direct(array, np.s_[start:stop])
        if validate:
            check_row_values(out, self.info.num_classes, self.path, row_offset=start)

    def read_selected(self, rows: np.ndarray, names: tuple[str, ...] = ("features", "logits", "labels")) -> dict[str, np.ndarray]:
        """Rows at sorted indices ``rows`` (1-D int array) of the named datasets."""
        return {name: self._file[name][rows] for name in names}

    def iter_blocks(self, block_rows: int | None = None, *, validate: bool = True) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield ``(start_row, arrays)`` for consecutive blocks (a multiple of the chunk size)."""
        chunk = self.info.chunk_rows
        block_rows = max(chunk, (block_rows or 16 * chunk) // chunk * chunk)
        for start in range(0, self.info.num_rows, block_rows):
            yield start, self.read_rows(start, min(start + block_rows, self.info.num_rows), validate=validate)

    def classifier(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The stage-1 classifier ``(weight (K, d), bias (K,) or None)`` if the bank stores it."""
        if not self.info.has_classifier:
            return None
        weight = torch.from_numpy(self._file["classifier/weight"][...].astype(np.float32))
        bias = None
        if "bias" in self._file["classifier"]:
            bias = torch.from_numpy(self._file["classifier/bias"][...].astype(np.float32))
        return weight, bias

    def load(self, *, validate: bool = True) -> Bank:
        """Read the whole bank into memory (features keep their stored dtype)."""
        n, d, k = self.info.num_rows, self.info.feature_dim, self.info.num_classes
        features = np.empty((n, d), dtype=self.info.feature_dtype)
        logits = np.empty((n, k), dtype=np.float32)
        small = {name: np.empty((n,), dtype=REQUIRED_DATASETS[name][1][0]) for name in ("labels", "sample_index", "view")}
        for start, block in self.iter_blocks(validate=validate):
            stop = start + block["logits"].shape[0]
            features[start:stop] = block["features"]
            logits[start:stop] = block["logits"]
            for name, arr in small.items():
                arr[start:stop] = block[name]
        classifier = self.classifier()
        return Bank(
            features=torch.from_numpy(features),
            logits=torch.from_numpy(logits),
            labels=torch.from_numpy(small["labels"]),
            sample_index=torch.from_numpy(small["sample_index"]),
            view=torch.from_numpy(small["view"]),
            info=self.info,
            classifier_weight=classifier[0] if classifier else None,
            classifier_bias=classifier[1] if classifier else None,
            extra={name: torch.from_numpy(self._file[name][...]) for name in self.info.extra_datasets},
            skipped=torch.from_numpy(self._file["skipped"][...].astype(np.int64)) if "skipped" in self._file else torch.zeros(0, dtype=torch.int64),
        )

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BankReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_row_values(arrays: dict[str, np.ndarray], num_classes: int, path: str, row_offset: int = 0) -> None:
    """Raise :class:`BankError` naming the first row with NaN/inf values or an out-of-range label."""
    for name in ("features", "logits"):
        values = arrays[name]
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0]) + row_offset
            raise BankError(f"{path}: dataset '{name}' has NaN or inf values in row {row}.")
    labels = arrays["labels"]
    bad = (labels < -1) | (labels >= num_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise BankError(
            f"{path}: dataset 'labels' has {int(labels[row])} in row {row + row_offset}; labels must be in 0..{num_classes - 1} (or -1 for unlabelled)."
        )


def open_bank(path: str | os.PathLike) -> BankReader:
    """Open a bank for reading (validates the header)."""
    return BankReader(path)


def load_bank(path: str | os.PathLike, *, validate: bool = True) -> Bank:
    """Load a whole bank into memory, validating header and values."""
    with BankReader(path) as reader:
        return reader.load(validate=validate)


def temporary_sibling(path: str | os.PathLike, suffix: str = ".partial") -> Path:
    """A unique temporary name next to ``path`` (same directory, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")


class BankWriter:
    """Append row blocks to a new bank; :meth:`finish` renames it into place.

    Until :meth:`finish`, rows live in a temporary sibling file whose ``complete`` attribute is false,
    so neither the final name nor the temporary file is ever read as a complete bank. An existing
    bank at ``path`` is only replaced with ``overwrite=True``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        feature_dim: int,
        class_names: list[str],
        feature_dtype: str = "float16",
        class_counts: np.ndarray | list[int] | None = None,
        model_fingerprint: str = "",
        preprocessing: dict | None = None,
        num_views: int = 1,
        task: str = "classification",
        background_index: int | None = None,
        classifier_weight: np.ndarray | torch.Tensor | None = None,
        classifier_bias: np.ndarray | torch.Tensor | None = None,
        extra_columns: dict[str, tuple[tuple[int, ...], str]] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        overwrite: bool = False,
        temporary_path: str | os.PathLike | None = None,
    ):
        from calib import __version__

        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise BankError(f"bank file {self.path} already exists; pass overwrite to replace it.")
        if feature_dtype not in FEATURE_DTYPES:
            raise BankError(f"feature_dtype should be one of {', '.join(FEATURE_DTYPES)}, found {feature_dtype!r}.")
        if task not in TASKS:
            raise BankError(f"task should be one of {', '.join(TASKS)}, found {task!r}.")
        self.num_classes = len(class_names)
        self.feature_dim = int(feature_dim)
        self.rows = 0
        self.temporary_path = Path(temporary_path) if temporary_path else temporary_sibling(self.path)
        self.temporary_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.temporary_path, "w")
        f, k, d = self._file, self.num_classes, self.feature_dim
        f.attrs["complete"] = False
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["class_names"] = json.dumps(list(class_names))
        if class_counts is not None:
            counts = np.asarray(class_counts, dtype=np.int64).reshape(-1)
            if counts.shape[0] != k:
                raise BankError(f"class_counts has {counts.shape[0]} entries, expected K={k}.")
            f.attrs["class_counts"] = counts
        f.attrs["model_fingerprint"] = model_fingerprint
        f.attrs["preprocessing"] = json.dumps(preprocessing or {})
        f.attrs["producer"] = f"disalign {__version__}"
        f.attrs["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        f.attrs["num_views"] = int(num_views)
        f.attrs["task"] = task
        f.attrs["background_index"] = -1 if background_index is None else int(background_index)
        chunk = max(1, int(chunk_rows))
        self._columns: dict[str, tuple[tuple[int, ...], str]] = {
            "features": ((d,), feature_dtype),
            "logits": ((k,), "float32"),
            "labels": ((), "int64"),
            "sample_index": ((), "int64"),
            "view": ((), "int16"),
            **(extra_columns or {}),
        }
        for name, (tail, dtype) in self._columns.items():
            f.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(chunk, *tail))
        if classifier_weight is not None:
            weight = np.asarray(classifier_weight, dtype=np.float32)
            if weight.shape != (k, d):
                raise BankError(f"classifier_weight should have shape ({k}, {d}), found {weight.shape}.")
            f.create_dataset("classifier/weight", data=weight)
            if classifier_bias is not None:
                bias = np.asarray(classifier_bias, dtype=np.float32).reshape(-1)
                if bias.shape != (k,):
                    raise BankError(f"classifier_bias should have shape ({k},), found {bias.shape}.")
                f.create_dataset("classifier/bias", data=bias)

    def append(self, **columns: np.ndarray | torch.Tensor) -> None:
        """Append a block of rows; every column of the bank must be given with the same row count."""
        missing = set(self._columns) - set(columns)
        unknown = set(columns) - set(self._columns)
        if missing or unknown:
            raise BankError(f"append needs exactly the columns {sorted(self._columns)}; missing {sorted(missing)}, unknown {sorted(unknown)}.")
        arrays = {name: np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value) for name, value in columns.items()}
        n = arrays["logits"].shape[0]
        for name, (tail, _dtype) in self._columns.items():
            if arrays[name].shape != (n, *tail):
                raise BankError(f"column '{name}' should have shape {(n, *tail)}, found {arrays[name].shape}.")
        for name, (_tail, dtype) in self._columns.items():
            ds = self._file[name]
            ds.resize(self.rows + n, axis=0)
            ds[self.rows : self.rows + n] = arrays[name].astype(dtype, copy=False)
        self.rows += n

    def write_dataset(self, name: str, data: np.ndarray) -> None:
        """Store a dataset that is not a row column (e.g. ``skipped``: the list rows that failed to decode)."""
        if name in self._columns or name == "classifier" or name in self._file:
            raise BankError(f"dataset '{name}' already exists in the bank being written.")
        self._file.create_dataset(name, data=np.asarray(data))

    def finish(self, extra_attrs: dict | None = None) -> Path:
        """Mark complete, close, and atomically rename to the final path."""
        for key, value in (extra_attrs or {}).items():
            self._file.attrs[key] = value
        self._file.attrs["complete"] = True
        self._file.flush()
        self._file.close()
        os.replace(self.temporary_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file."""
        try:
            self._file.close()
        finally:
            self.temporary_path.unlink(missing_ok=True)

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_bank(
    path: str | os.PathLike,
    features: np.ndarray | torch.Tensor,
    logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    sample_index: np.ndarray | torch.Tensor | None = None,
    view: np.ndarray | torch.Tensor | None = None,
    class_names: list[str] | None = None,
    **writer_kwargs,
) -> Path:
    """Write a whole bank in one call (tests, synthetic banks). Keyword arguments go to :class:`BankWriter`."""
    logits = np.asarray(logits, dtype=np.float32)
    features = np.asarray(features)
    n, k = logits.shape
    if class_names is None:
        class_names = [str(i) for i in range(k)]
    if sample_index is None:
        sample_index = np.arange(n, dtype=np.int64)
    if view is None:
        view = np.zeros(n, dtype=np.int16)
    extra = writer_kwargs.pop("extra", {}) or {}
    extra_columns = {name: (tuple(np.asarray(a).shape[1:]), np.asarray(a).dtype.name) for name, a in extra.items()}
    with BankWriter(path, feature_dim=features.shape[1], class_names=class_names, extra_columns=extra_columns, **writer_kwargs) as writer:
        writer.append(features=features, logits=logits, labels=np.asarray(labels), sample_index=np.asarray(sample_index), view=np.asarray(view), **extra)
        return writer.finish()
