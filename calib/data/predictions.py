"""Batch predictions of ``disalign predict`` (:mod:`disalign.cli.predict`), written as CSV, JSON Lines or HDF5.

    disalign predict test.h5 --calibration calib/ --out predictions.csv [--top-k 5] [--stage1] [--list test.txt]

The format follows the extension of ``--out``: ``.csv``, ``.jsonl`` (or ``.ndjson``), ``.h5`` (or ``.hdf5``).
Per row of the bank (every view, labelled or not), in bank order:

- ``row``, ``sample_index`` (the row of the source list), ``view``, the bank's own label as ``true_index`` (-1:
  unlabelled) and ``true_label`` (its class name; empty / null when unlabelled);
- ``path``: the list row's image path, with ``--list`` (the list or COCO JSON the bank was extracted from;
  a COCO JSON gives ``file_name``). The bank's ``source`` attribute only names that file: paths in a bank
  are data, never files to open;
- the calibrated top-k, best first, in the server's vocabulary (``service/schemas.py``, ``Prediction``):
  ``label`` (the class name), ``index`` (the class index), ``probability``;
- with ``--stage1``: the same top-k of the raw stage-1 logits (softmax), to see what the calibration changed.

CSV has one column per field (``top1_label, top1_index, top1_probability, top2_label, …``, then
``stage1_top1_label, …``); JSON Lines one object per row with lists ``top_k`` / ``stage1_top_k`` of
``{"label", "index", "probability"}``; HDF5 the datasets ``row``, ``sample_index``, ``view``, ``true_index``,
``path`` and ``top_k_indices`` (N, k) int64 / ``top_k_probabilities`` (N, k) float32 (+ ``stage1_…``), with
``class_names`` (JSON) among the attributes (the names of the indices). The bank is read in blocks, so its size is not bounded by
memory; the output is written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from disalign.calib.errors import InputError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".h5": "hdf5", ".hdf5": "hdf5"}


@dataclass
class Predictions:
    """One block of rows: 1-D arrays (n,), top-k arrays (n, k), paths (n,) or None."""

    row: np.ndarray
    sample_index: np.ndarray
    view: np.ndarray
    true_index: np.ndarray  # the bank's labels (-1: unlabelled)
    top_indices: np.ndarray
    top_probabilities: np.ndarray
    stage1_indices: np.ndarray | None
    stage1_probabilities: np.ndarray | None
    paths: list[str] | None


# -- the path column --------------------------------------------------------------------------------
def source_paths(bank: Path, sample_index: np.ndarray, list_file: Path | None) -> tuple[list[str] | None, str]:
    """``(paths, why_not)``: the image path of every list row the bank's ``sample_index`` refers to, or None
    and the reason when unknown.

    Only ``list_file``, the user's own argument, is ever opened: it must exist and cover every sample_index.
    The bank's ``source`` attribute is data (anyone who wrote the bank chose it), so it is only named in
    the reason, never read.
    """
    needed = int(sample_index.max()) + 1 if sample_index.size else 0
    if list_file is not None:
        paths = read_source(list_file)
        if paths is None:
            raise InputError(f"--list {list_file} is not a readable list file or COCO JSON.")
        if len(paths) < needed:
            raise InputError(f"--list {list_file} has {len(paths)} rows but the bank refers to row {needed - 1}.")
        return paths, ""
    import h5py

    with h5py.File(bank, "r") as f:  # one optional attribute the bank reader does not expose
        source = f.attrs.get("source")
    if not isinstance(source, str) or not source:
        return None, "the bank records no source list: no path column (pass --list to add one)."
    return None, (f"no path column: the bank records its source list as {source!r}, which is not opened unless you pass it "
                  f"(--list {source}).")


def read_source(path: Path) -> list[str] | None:
    """Image paths of a list file (first field of each non-blank, non-comment line) or of a COCO JSON
    (``images[].file_name``); None when the file is neither."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if path.suffix.lower() == ".json":
        try:
            return [str(image["file_name"]) for image in json.loads(text)["images"]]
        except (ValueError, KeyError, TypeError):
            return None
    return [line.split()[0] for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


# -- writers: each writes a temporary sibling, renamed into place by finish() ------------------------
class _Writer:
    def __init__(self, path: Path, *, k: int, stage1: bool, with_paths: bool, class_names: list[str], attrs: dict):
        from disalign.calib.files import temporary_sibling

        self.path, self.k, self.stage1, self.with_paths = path, k, stage1, with_paths
        self.class_names, self.attrs = class_names, attrs
        self.tmp = temporary_sibling(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def finish(self) -> None:
        from disalign.calib.files import replace_with

        self._close()
        replace_with(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        """Flush and close the temporary file; each output format implements it."""
        raise NotImplementedError


class CsvWriter(_Writer):
    def __init__(self, path: Path, **kwargs):
        super().__init__(path, **kwargs)
        self.file = open(self.tmp, "w", newline="")
        self.csv = csv.writer(self.file)
        header = ["row", "sample_index", "view", "true_index", "true_label"] + (["path"] if self.with_paths else [])
        for prefix in ("", "stage1_") if self.stage1 else ("",):
            for i in range(1, self.k + 1):
                header += [f"{prefix}top{i}_label", f"{prefix}top{i}_index", f"{prefix}top{i}_probability"]
        self.csv.writerow(header)

    def write(self, block: Predictions, names: np.ndarray) -> None:
        columns = [block.row.tolist(), block.sample_index.tolist(), block.view.tolist(), block.true_index.tolist(),
                   [str(names[y]) if y >= 0 else "" for y in block.true_index.tolist()]]
        if block.paths is not None:
            columns.append(block.paths)
        for indices, probabilities in _top_k_pairs(block):
            for i in range(self.k):
                columns += [names[indices[:, i]].tolist(), indices[:, i].tolist(), [f"{p:.6g}" for p in probabilities[:, i].tolist()]]
        self.csv.writerows(zip(*columns, strict=True))

    def _close(self) -> None:
        self.file.close()


class JsonlWriter(_Writer):
    def __init__(self, path: Path, **kwargs):
        super().__init__(path, **kwargs)
        self.file = open(self.tmp, "w")

    def write(self, block: Predictions, names: np.ndarray) -> None:
        tops = [[[{"label": str(names[c]), "index": int(c), "probability": round(float(p), 6)} for c, p in zip(ind, prob, strict=True)]
                 for ind, prob in zip(indices.tolist(), probabilities.tolist(), strict=True)] for indices, probabilities in _top_k_pairs(block)]
        for j in range(block.row.size):
            true = int(block.true_index[j])
            record = {"row": int(block.row[j]), "sample_index": int(block.sample_index[j]), "view": int(block.view[j]),
                      "true_index": true, "true_label": str(names[true]) if true >= 0 else None}
            if block.paths is not None:
                record["path"] = block.paths[j]
            record["top_k"] = tops[0][j]
            if len(tops) > 1:
                record["stage1_top_k"] = tops[1][j]
            self.file.write(json.dumps(record) + "\n")

    def _close(self) -> None:
        self.file.close()


class Hdf5Writer(_Writer):
    def __init__(self, path: Path, **kwargs):
        import h5py

        super().__init__(path, **kwargs)
        self.file = h5py.File(self.tmp, "w")
        self.columns = {"row": ((), "int64"), "sample_index": ((), "int64"), "view": ((), "int16"), "true_index": ((), "int64"),
                        "top_k_indices": ((self.k,), "int64"), "top_k_probabilities": ((self.k,), "float32")}
        if self.stage1:
            self.columns |= {"stage1_top_k_indices": ((self.k,), "int64"), "stage1_top_k_probabilities": ((self.k,), "float32")}
        if self.with_paths:
            self.columns["path"] = ((), h5py.string_dtype())
        for name, (tail, dtype) in self.columns.items():
            self.file.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(4096, *tail))
        self.file.attrs["class_names"] = json.dumps(self.class_names)
        self.file.attrs["top_k"] = self.k
        for key, value in self.attrs.items():
            self.file.attrs[key] = value
        self.rows = 0

    def write(self, block: Predictions, names: np.ndarray) -> None:
        values = {"row": block.row, "sample_index": block.sample_index, "view": block.view, "true_index": block.true_index,
                  "top_k_indices": block.top_indices, "top_k_probabilities": block.top_probabilities,
                  "stage1_top_k_indices": block.stage1_indices, "stage1_top_k_probabilities": block.stage1_probabilities,
                  "path": block.paths}
        n = block.row.size
        for name in self.columns:
            dataset = self.file[name]
            dataset.resize(self.rows + n, axis=0)
            dataset[self.rows:] = values[name]
        self.rows += n

    def _close(self) -> None:
        self.file.close()


def _top_k_pairs(block: Predictions) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = [(block.top_indices, block.top_probabilities)]
    if block.stage1_indices is not None:
        pairs.append((block.stage1_indices, block.stage1_probabilities))
    return pairs


WRITERS = {"csv": CsvWriter, "jsonl": JsonlWriter, "hdf5": Hdf5Writer}
