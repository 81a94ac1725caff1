"""Feature banks: HDF5 files of cached stage-1 outputs (spec: ``docs/bank-format.md``).

One file per split. Rows are samples (images, pixels or RoIs; several augmented views of one image are
several rows). Readers validate the header on open and the values (NaN/inf, label range) while reading,
and can stream row blocks so a bank larger than RAM can be used. :class:`BankWriter` appends row blocks
to a temporary file and renames it into place only when complete, so a half-written bank is never
readable under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import torch

from disalign.calib import json_text
from disalign.calib.errors import BankError, InputError
from disalign.calib.files import file_kind, replace_with, temporary_sibling

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


def clean_labelled_rows(view: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Bool mask (N,) of the rows that count as labelled samples: the clean view (view 0, the image as the
    model saw it, not an augmented copy) with a label (>= 0; -1 is unlabelled).

    Class counts, validation and test scores and what is fitted on a validation bank use these rows;
    augmented views only add training rows (counting or scoring them would weigh an image by its number
    of views). Works on torch tensors and numpy arrays alike (the mask is of the same kind).
    """
    return (view == 0) & (labels >= 0)


def rows_digest(logits: torch.Tensor, labels: torch.Tensor) -> str:
    """A digest of rows (logits (n, K) as float32, labels (n,) as int64): tells whether a fit trained on the very
    rows an evaluation scores on (validation rows mixed into a DisAlign fit)."""
    digest = hashlib.sha256(labels.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(logits.to(torch.float32).contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


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
        clean = clean_labelled_rows(self.view, self.labels)
        return np.bincount(self.labels[clean].numpy(), minlength=self.num_classes).astype(np.int64)

    @classmethod
    def from_arrays(cls, features, logits, labels, class_counts=None, *, classifier=None, class_names=None,
                    model_fingerprint: str = "", role: str = "train") -> Bank:
        """An in-memory bank of arrays (numpy or torch): the array API of the estimators
        (``fit(features, logits, labels, class_counts=None)``) goes through here.

        features (N, d) or None (logits-only methods: stored as (N, 0)), logits (N, K), labels (N,) in
        0..K-1 or -1 (unlabelled); class_counts (K,) training counts, None: the labels' histogram;
        classifier ``(weight (K, d), bias (K,) or None)``, the stage-1 linear layer (tau-norm, tde);
        model_fingerprint: needed to save the calibration. Every row is a clean view of its own image.
        """
        logits = _as_float_tensor(logits, f"{role} logits")
        if logits.ndim != 2 or logits.shape[1] < 1:
            raise InputError(f"{role} logits should be a 2d array (N, K), got an array of shape {tuple(logits.shape)} instead.")
        n, k = logits.shape
        if features is None:
            features = torch.zeros((n, 0), dtype=torch.float32)
        features = _as_float_tensor(features, f"{role} features")
        if features.ndim != 2 or features.shape[0] != n:
            raise InputError(f"{role} features should be a 2d array ({n}, d) like the logits, got an array of shape "
                             f"{tuple(features.shape)} instead.")
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1 or labels.shape[0] != n or labels.is_floating_point() and not bool((labels == labels.round()).all()):
            raise InputError(f"{role} labels should be a 1d array of {n} integer labels, got an array of shape {tuple(labels.shape)} "
                             f"and dtype {labels.dtype} instead.")
        labels = labels.to(torch.int64)
        if n and (int(labels.min()) < -1 or int(labels.max()) >= k):
            raise InputError(f"{role} labels should be in 0..{k - 1} (or -1 for unlabelled), found {int(labels.min())}..{int(labels.max())}.")
        if not (torch.isfinite(features).all() and torch.isfinite(logits).all()):
            raise InputError(f"{role} features and logits must be finite; found NaN or inf.")
        if class_counts is not None:
            class_counts = np.asarray(class_counts)
            if class_counts.shape != (k,) or not np.issubdtype(class_counts.dtype, np.number) or (class_counts < 0).any():
                raise InputError(f"class_counts should be {k} training counts >= 0 (one per logit column), got an array of shape "
                                 f"{class_counts.shape} instead.")
            class_counts = class_counts.astype(np.int64)
        weight = bias = None
        if classifier is not None:
            weight, bias = classifier if isinstance(classifier, tuple | list) else (classifier, None)
            weight = _as_float_tensor(weight, "classifier weight").to(torch.float32)
            d = features.shape[1] or weight.shape[-1]
            if weight.shape != (k, d):
                raise InputError(f"the classifier weight should have shape ({k}, {d}) (K, d), got {tuple(weight.shape)} instead.")
            if bias is not None:
                bias = _as_float_tensor(bias, "classifier bias").to(torch.float32)
                if bias.shape != (k,):
                    raise InputError(f"the classifier bias should have shape ({k},), got {tuple(bias.shape)} instead.")
        names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
        if len(names) != k:
            raise InputError(f"class_names should name the K={k} classes, found {len(names)} names.")
        info = BankInfo(path=f"<{role} arrays>", num_rows=n, feature_dim=int(features.shape[1]), num_classes=k,
                        feature_dtype="float16" if features.dtype == torch.float16 else "float32", class_names=names,
                        class_counts=class_counts, model_fingerprint=model_fingerprint, preprocessing={}, producer="arrays",
                        created="", num_views=1, has_classifier=weight is not None)
        return cls(features=features, logits=logits.to(torch.float32), labels=labels,
                   sample_index=torch.arange(n, dtype=torch.int64), view=torch.zeros(n, dtype=torch.int16), info=info,
                   classifier_weight=weight, classifier_bias=bias)


def _as_float_tensor(value, name: str) -> torch.Tensor:
    """A floating-point tensor of a numpy array or tensor (float16 and float32 kept, other numbers → float32)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise InputError(f"{name} should be a numeric array, found dtype {value.dtype}.")
        value = torch.from_numpy(np.array(value, copy=not value.flags.writeable or not value.flags.c_contiguous))
    elif not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} should be a numpy array or a torch tensor, found {type(value).__name__}.") from exc
    return value if value.dtype in (torch.float16, torch.float32) else value.to(torch.float32)


def _json_attr(attrs, name: str, default, kind: type, what: str, path: str):
    """A JSON-text attribute decoded and checked to be a ``kind`` (list or dict)."""
    if name not in attrs:
        return default
    raw = attrs[name]
    if isinstance(raw, bytes | np.bytes_):
        raw = raw.decode(errors="replace")
    if not isinstance(raw, str):
        raise BankError(f"{path}: attribute '{name}' should be JSON text ({what}), found {_kind_of(raw)}.")
    try:
        value = json_text.loads(raw, f"{path}: attribute '{name}'", BankError)
    except json.JSONDecodeError as exc:
        raise BankError(f"{path}: attribute '{name}' should be JSON text ({what}), found {raw!r:.80}.") from exc
    if not isinstance(value, kind):
        raise BankError(f"{path}: attribute '{name}' should be JSON text ({what}), found {type(value).__name__} {raw!r:.80}.")
    return value


def _int_attr(attrs, name: str, default: int, path: str) -> int:
    """An integer attribute: a numpy or Python integer (not a string, float or bool)."""
    if name not in attrs:
        return default
    raw = attrs[name]
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    if isinstance(raw, bool | np.bool_) or not isinstance(raw, int | np.integer):
        raise BankError(f"{path}: attribute '{name}' should be an integer, found {_kind_of(raw)}.")
    return int(raw)


def _str_attr(attrs, name: str, default: str, path: str) -> str:
    if name not in attrs:
        return default
    raw = attrs[name]
    if isinstance(raw, bytes | np.bytes_):
        return raw.decode(errors="replace")
    if not isinstance(raw, str):
        raise BankError(f"{path}: attribute '{name}' should be a string, found {_kind_of(raw)}.")
    return raw


def _kind_of(value) -> str:
    """What a value is, for a message: ``string '3'``, ``float64 array of shape (3,)``, ``int64 1``."""
    if isinstance(value, str | bytes | np.bytes_ | np.str_):
        return f"string {value!r:.40}"
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    if isinstance(value, np.generic):
        return f"{value.dtype} {value.item()!r:.40}"
    return f"{type(value).__name__} {value!r:.40}"


def _dataset(f: h5py.File, name: str, path: str) -> h5py.Dataset:
    node = f.get(name)
    if node is None:
        raise BankError(f"{path}: required dataset '{name}' is missing.")
    if not isinstance(node, h5py.Dataset):
        raise BankError(f"{path}: '{name}' should be a dataset, found a {type(node).__name__.lower()}.")
    return node


def _is_numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "biuf"


def _unwritten(ds: h5py.Dataset) -> bool:
    """True when a (non-virtual) dataset declares more data than it stores: chunks never written, or a
    contiguous dataset never allocated. Reading those parts gives fill values, not rows."""
    if ds.is_virtual or ds.size == 0:
        return False  # a virtual dataset's data lives in its source files (extract --assemble virtual)
    if ds.chunks is None:
        return ds.id.get_storage_size() < ds.size * ds.dtype.itemsize
    expected = 1
    for extent, chunk in zip(ds.shape, ds.chunks, strict=True):
        expected *= -(-extent // chunk)
    return ds.id.get_num_chunks() < expected


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit (containers); None if unknown."""
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max" and available is not None:
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def direct_chunk_rows(dataset: h5py.Dataset) -> int | None:
    """Rows per chunk when the dataset's chunks can be read from the file as plain bytes: chunked by whole
    rows, no filter (compression, shuffle, checksum), native byte order; else None."""
    if dataset.chunks is None or tuple(dataset.chunks[1:]) != tuple(dataset.shape[1:]) or not dataset.dtype.isnative:
        return None
    if not hasattr(dataset.id, "get_chunk_info_by_coord"):  # h5py built against HDF5 < 1.10.5
        return None
    if dataset.id.get_create_plist().get_nfilters() != 0:
        return None
    return int(dataset.chunks[0])


class BankReader:
    """Read-only access to one bank file; use as a context manager.

    Opening validates the header (a regular file; datasets, dtypes, shapes, attributes with their types;
    every declared row stored) before any row is read; :meth:`iter_blocks` and :meth:`load` validate values
    block by block, and :meth:`load` first checks that the rows fit in the available memory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not Path(self.path).exists():
            raise BankError(f"bank file {self.path} does not exist.")
        kind = file_kind(self.path)
        if kind is not None:  # h5py would block on a FIFO until a writer comes
            raise BankError(f"bank file {self.path} is {kind}, not a regular file.")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise BankError(f"bank file {self.path} is not a readable HDF5 file ({exc}).") from exc
        self._fd: int | None = None  # opened by the first direct chunk read
        self._direct_rows: dict[str, int | None] = {}
        try:
            self.info = self._read_header()
        except BaseException:
            self._file.close()
            raise

    # -- header -----------------------------------------------------------------------------------
    def _read_header(self) -> BankInfo:
        f, path = self._file, self.path
        complete = f.attrs.get("complete", False)
        if not isinstance(complete, bool | np.bool_) or not complete:
            raise BankError(f"{path} is not a complete bank (its writer did not finish); re-run the extraction.")
        version = _int_attr(f.attrs, "schema_version", -1, path)
        if version != SCHEMA_VERSION:
            raise BankError(f"{path}: schema_version should be {SCHEMA_VERSION}, found {version}.")
        for name, (ndim, dtypes) in REQUIRED_DATASETS.items():
            ds = _dataset(f, name, path)
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
        if k < 2:
            raise BankError(f"{path}: the logits have K={k} column{'' if k == 1 else 's'}; a bank needs K >= 2 classes "
                            "(a calibration balances classes against each other).")
        class_names = _json_attr(f.attrs, "class_names", [str(i) for i in range(k)], list, f"a list of {k} class names", path)
        if len(class_names) != k:
            raise BankError(f"{path}: attribute 'class_names' has {len(class_names)} names but the logits have K={k} columns.")
        if not all(isinstance(name, str) for name in class_names):
            raise BankError(f"{path}: attribute 'class_names' should hold strings, found {class_names!r:.80}.")
        class_counts = None
        if "class_counts" in f.attrs:
            raw = np.asarray(f.attrs["class_counts"])
            if raw.dtype.kind not in "iu" or raw.ndim != 1:
                raise BankError(f"{path}: attribute 'class_counts' should be an integer array of K={k} counts, found {_kind_of(f.attrs['class_counts'])}.")
            class_counts = raw.astype(np.int64)
            if class_counts.shape[0] != k:
                raise BankError(f"{path}: attribute 'class_counts' has {class_counts.shape[0]} entries, expected K={k}.")
            if (class_counts < 0).any():
                raise BankError(f"{path}: attribute 'class_counts' should be counts >= 0, found {int(class_counts.min())}.")
        task = _str_attr(f.attrs, "task", "classification", path)
        if task not in TASKS:
            raise BankError(f"{path}: attribute 'task' should be one of {', '.join(TASKS)}, found {task!r}.")
        bg = _int_attr(f.attrs, "background_index", -1, path)
        if not -1 <= bg < k:
            raise BankError(f"{path}: attribute 'background_index' should be -1 (none) or a column in 0..{k - 1}, found {bg}.")
        num_views = _int_attr(f.attrs, "num_views", 1, path)
        if num_views < 1:
            raise BankError(f"{path}: attribute 'num_views' should be >= 1, found {num_views}.")
        has_classifier = self._check_classifier(k, d)
        self._check_optional_datasets(n)
        for name in REQUIRED_DATASETS:
            if _unwritten(f[name]):
                raise BankError(f"{path}: dataset '{name}' declares {n} rows but stores fewer; the file is truncated or "
                                "was not written by a bank writer.")
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
            class_names=class_names,
            class_counts=class_counts,
            model_fingerprint=_str_attr(f.attrs, "model_fingerprint", "", path),
            preprocessing=_json_attr(f.attrs, "preprocessing", {}, dict, "an object", path),
            producer=_str_attr(f.attrs, "producer", "", path),
            created=_str_attr(f.attrs, "created", "", path),
            num_views=num_views,
            task=task,
            background_index=None if bg < 0 else bg,
            has_classifier=has_classifier,
            chunk_rows=int(chunks[0]) if chunks else DEFAULT_CHUNK_ROWS,
            extra_datasets=extra,
        )

    def _check_classifier(self, k: int, d: int) -> bool:
        f, path = self._file, self.path
        if "classifier" not in f:
            return False
        if not isinstance(f["classifier"], h5py.Group) or "weight" not in f["classifier"]:
            return False
        for name, shape in (("classifier/weight", (k, d)), ("classifier/bias", (k,))):
            if name == "classifier/bias" and name not in f:
                continue
            ds = _dataset(f, name, path)
            if ds.shape != shape or not _is_numeric(ds.dtype):
                raise BankError(f"{path}: dataset '{name}' should be numbers of shape {shape}, found {ds.dtype} of shape {ds.shape}.")
        return True

    def _check_optional_datasets(self, n: int) -> None:
        """``skipped`` is a 1-D integer dataset; per-row columns (N rows) hold numbers (they become tensors)."""
        f, path = self._file, self.path
        if "skipped" in f:
            ds = _dataset(f, "skipped", path)
            if ds.ndim != 1 or ds.dtype.kind not in "iu":
                raise BankError(f"{path}: dataset 'skipped' should be a 1-D integer array of list rows, found {ds.dtype} of shape {ds.shape}.")
        for name in f:
            node = f[name]
            if name in REQUIRED_DATASETS or name == "skipped" or not isinstance(node, h5py.Dataset):
                continue
            if node.ndim >= 1 and node.shape[0] == n and not _is_numeric(node.dtype):
                raise BankError(f"{path}: per-row dataset '{name}' should hold numbers or booleans, found dtype {node.dtype}.")

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
        features, logits and labels among them.

        Chunks stored without any filter (what :class:`BankWriter` writes) are read with ``preadv`` at their
        offset in the file, one system call per chunk: 3–4× faster than HDF5's read path, which copies
        each chunk once more (the streamed fit reads its whole bank every epoch). Anything else — a
        compressed or unallocated chunk, a start inside a chunk — goes through h5py."""
        for name, array in out.items():
            if not self._read_chunks_directly(name, start, stop, array):
                self._file[name].read_direct(array, np.s_[start:stop])
        if validate:
            check_row_values(out, self.info.num_classes, self.path, row_offset=start)

    def _read_chunks_directly(self, name: str, start: int, stop: int, array: np.ndarray) -> bool:
        """Read rows [start, stop) of dataset ``name`` into ``array`` chunk by chunk from the file; False
        (nothing promised about ``array``) when the layout does not allow it."""
        dataset = self._file[name]
        if name not in self._direct_rows:
            self._direct_rows[name] = direct_chunk_rows(dataset)
        rows = self._direct_rows[name]
        if rows is None or start % rows or array.dtype != dataset.dtype or not array.flags.c_contiguous or stop <= start:
            return False
        plan = []
        for lo in range(start, stop, rows):
            info = dataset.id.get_chunk_info_by_coord((lo,) + (0,) * (dataset.ndim - 1))
            if info.byte_offset is None or info.filter_mask:  # not written, or a filter skipped: HDF5 knows
                return False
            plan.append((lo, min(lo + rows, stop), info.byte_offset))
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        row_bytes = array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
        view = memoryview(array).cast("B")
        for lo, hi, offset in plan:  # a chunk stores its rows first, in C order: rows lo..hi are its first bytes
            begin, size = (lo - start) * row_bytes, (hi - lo) * row_bytes
            if os.preadv(self._fd, [view[begin : begin + size]], offset) != size:
                raise BankError(f"bank file {self.path} is truncated: '{name}' rows {lo}..{hi} end past the end of the file.")
        return True

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

    def row_bytes(self) -> int:
        """Bytes of one row in memory: the required datasets and the per-row columns."""
        f = self._file
        size = 0
        for name in (*REQUIRED_DATASETS, *self.info.extra_datasets):
            ds = f[name]
            size += ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
        return size

    def check_fits_in_memory(self) -> None:
        """Refuse to load a bank whose rows need more memory than is available (one sentence, not a MemoryError)."""
        needed = self.info.num_rows * self.row_bytes()
        available = available_memory()
        if available is not None and needed > available:
            raise BankError(f"{self.path} declares {self.info.num_rows} rows, {needed / 2**30:.1f} GiB in memory, more than the "
                            f"{available / 2**30:.1f} GiB available; fit it streamed with --max-memory, or use a larger machine.")

    def load(self, *, validate: bool = True) -> Bank:
        """Read the whole bank into memory (features keep their stored dtype)."""
        self.check_fits_in_memory()
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
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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
        from disalign.calib import __version__

        self.path = Path(path)
        kind = file_kind(self.path, follow_symlinks=False) if os.path.lexists(self.path) else None
        if kind is not None:  # a rename over it would replace a FIFO, a device or a link with a regular file
            raise BankError(f"bank file {self.path} is {kind}; expected a regular file or a new name.")
        if self.path.exists() and not overwrite:
            raise BankError(f"bank file {self.path} already exists; pass overwrite to replace it.")
        if feature_dtype not in FEATURE_DTYPES:
            raise BankError(f"feature_dtype should be one of {', '.join(FEATURE_DTYPES)}, found {feature_dtype!r}.")
        if task not in TASKS:
            raise BankError(f"task should be one of {', '.join(TASKS)}, found {task!r}.")
        self.num_classes = len(class_names)
        if self.num_classes < 2:
            raise BankError(f"class_names has {self.num_classes} class{'' if self.num_classes == 1 else 'es'}; a bank needs K >= 2 "
                            "classes (a calibration balances classes against each other).")
        self.feature_dim = int(feature_dim)
        k, d = self.num_classes, self.feature_dim
        # Every argument is checked before the temporary file (or its folder) exists: a refused writer
        # leaves nothing behind, and the caller, who never got a writer, has nothing to abort.
        counts = None if class_counts is None else self._checked_class_counts(class_counts, k)
        weight, bias = self._checked_classifier(classifier_weight, classifier_bias, k, d)
        self.rows = 0
        chunk = max(1, int(chunk_rows))
        self._columns: dict[str, tuple[tuple[int, ...], str]] = {
            "features": ((d,), feature_dtype),
            "logits": ((k,), "float32"),
            "labels": ((), "int64"),
            "sample_index": ((), "int64"),
            "view": ((), "int16"),
            **(extra_columns or {}),
        }
        self.temporary_path = Path(temporary_path) if temporary_path else temporary_sibling(self.path, ".partial")
        self.temporary_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.temporary_path, "w")
        try:
            f = self._file
            f.attrs["complete"] = False
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["class_names"] = json.dumps(list(class_names))
            if counts is not None:
                f.attrs["class_counts"] = counts
            f.attrs["model_fingerprint"] = model_fingerprint
            f.attrs["preprocessing"] = json.dumps(preprocessing or {})
            f.attrs["producer"] = f"disalign {__version__}"
            f.attrs["created"] = datetime.now(UTC).isoformat(timespec="seconds")
            f.attrs["num_views"] = int(num_views)
            f.attrs["task"] = task
            f.attrs["background_index"] = -1 if background_index is None else int(background_index)
            for name, (tail, dtype) in self._columns.items():
                f.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(chunk, *tail))
            if weight is not None:
                f.create_dataset("classifier/weight", data=weight)
            if bias is not None:
                f.create_dataset("classifier/bias", data=bias)
        except BaseException:
            self.abort()  # e.g. an extra column of a dtype HDF5 cannot store: no half-made file either
            raise

    @staticmethod
    def _checked_class_counts(class_counts: np.ndarray | list[int], k: int) -> np.ndarray:
        """``class_counts`` as K int64 counts >= 0: the rule :class:`BankReader` applies when it opens the bank."""
        counts = np.asarray(class_counts, dtype=np.int64).reshape(-1)
        if counts.shape[0] != k:
            raise BankError(f"class_counts has {counts.shape[0]} entries, expected K={k}.")
        if (counts < 0).any():
            raise BankError(f"class_counts should be counts >= 0, found {int(counts.min())}.")
        return counts

    @staticmethod
    def _checked_classifier(weight, bias, k: int, d: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The classifier as float32 ``(K, d)`` weight and ``(K,)`` bias; a bias without a weight is not stored."""
        if weight is None:
            return None, None
        weight = np.asarray(weight, dtype=np.float32)
        if weight.shape != (k, d):
            raise BankError(f"classifier_weight should have shape ({k}, {d}), found {weight.shape}.")
        if bias is None:
            return weight, None
        bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        if bias.shape != (k,):
            raise BankError(f"classifier_bias should have shape ({k},), found {bias.shape}.")
        return weight, bias

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
        return replace_with(self.temporary_path, self.path)

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
