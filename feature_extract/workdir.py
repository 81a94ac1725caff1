"""The resumable work directory of one extraction, and the assembly of banks from it.

HDF5 is not crash-safe, so rows are first written as small numpy files, one per completed chunk of list
rows, each with :func:`disalign.calib.files.write_atomic` (temporary name, fsync, rename, fsync of the
directory): a part either exists complete or not at all, after a kill or a power cut. ``BANK.h5.parts/`` holds::

    manifest.json        what determines the rows (model fingerprint, list digest, preprocessing, views,
                         seed, batch and chunk sizes, device type, …); a restart with other values is refused
    chunk-000000.npz     features, logits, labels, sample_index, view, skipped (list rows that failed)
    chunk-000001.npz     …

When every chunk is there, the parts are assembled into the bank with :class:`disalign.calib.data.bank.BankWriter`
(a temporary name, renamed when complete) and the directory is deleted. Under torchrun with
``--assemble virtual`` each rank first writes its shard bank into ``BANK.h5.shards/`` and rank 0 writes
the final bank as HDF5 virtual datasets that point at the shards (which must stay beside it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from disalign.calib.data.bank import REQUIRED_DATASETS, BankReader, BankWriter
from disalign.calib.files import check_output_file, replace_with, temporary_sibling, write_atomic
from disalign.feature_extract.errors import EmptyBankError, ExtractError

PART_COLUMNS = ("features", "logits", "labels", "sample_index", "view")
MANIFEST_VERSION = 1


class WorkDir:
    """``BANK.h5.parts/``: a manifest plus one ``chunk-NNNNNN.npz`` per completed chunk."""

    def __init__(self, bank_path: Path):
        self.path = bank_path.with_name(bank_path.name + ".parts")

    def prepare(self, manifest: dict, *, explain: dict[str, str] | None = None) -> None:
        """Create the directory, or check that an existing one was started with the same manifest.

        ``explain``: for a manifest key whose change the user did not make (a random model's fingerprint),
        the reason, said instead of "rerun with the same arguments".
        """
        manifest = json.loads(json.dumps({"version": MANIFEST_VERSION, **manifest}))
        manifest_path = self.path / "manifest.json"
        if manifest_path.exists():
            try:
                old = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ExtractError(f"{manifest_path} is not readable JSON ({exc}); delete {self.path} to start over.") from exc
            if old != manifest:
                keys = [key for key in sorted(set(old) | set(manifest)) if old.get(key) != manifest.get(key)]
                changed = "; ".join(f"{key}: {old.get(key)!r:.60} → {manifest.get(key)!r:.60}" for key in keys)
                reasons = [(explain or {})[key] for key in keys if key in (explain or {})]
                if reasons and len(reasons) == len(keys):
                    raise ExtractError(f"{self.path} holds an unfinished extraction of another model: {'; '.join(reasons)} ({changed}); "
                                       f"pass --weights (a state_dict) to make the extraction resumable, or delete {self.path} to start over.")
                raise ExtractError(
                    f"{self.path} holds an unfinished extraction started with different arguments ({changed}); "
                    f"rerun with the same arguments to resume, or delete {self.path} to start over."
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())

    def part_path(self, chunk: int) -> Path:
        return self.path / f"chunk-{chunk:06d}.npz"

    def has_part(self, chunk: int) -> bool:
        return self.part_path(chunk).exists()

    def write_part(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        write_atomic(self.part_path(chunk), lambda fh: np.savez(fh, **arrays))

    def read_part(self, chunk: int) -> dict[str, np.ndarray]:
        path = self.part_path(chunk)
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in (*PART_COLUMNS, "skipped")}
        except (OSError, ValueError, KeyError) as exc:
            raise ExtractError(f"part {path} is unreadable ({exc}); delete it and rerun to redo that chunk.") from exc

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class BankHeader:
    """Everything of a bank except its rows: :class:`BankWriter` keyword arguments plus extra attributes."""

    writer_kwargs: dict
    extra_attrs: dict = field(default_factory=dict)


class PartsAssembler:
    """Append parts to a new bank in chunk order while the extraction runs; :meth:`finish` completes it.

    Parts stay the source of truth: a part is appended when it arrives (:meth:`add`) or, for chunks done
    by an earlier run or another rank, read back from the work directory when its turn comes. The bank
    is written under ``temporary_path`` (inside the work directory) and renamed into place by finish.
    """

    def __init__(self, out: Path, header: BankHeader, workdir: WorkDir, chunks: Iterable[int], *, overwrite: bool, temporary_path: Path):
        self.header, self.workdir = header, workdir
        self.chunks = list(chunks)
        self.on_disk = {c for c in self.chunks if workdir.has_part(c)}
        self.pos = 0
        self.waiting: dict[int, dict[str, np.ndarray]] = {}
        self.skipped: list[np.ndarray] = []
        self.writer = BankWriter(out, overwrite=overwrite, temporary_path=temporary_path, **header.writer_kwargs)

    def add(self, chunk: int, part: dict[str, np.ndarray]) -> None:
        self.waiting[chunk] = part
        self._drain(everything_on_disk=False)

    def _drain(self, everything_on_disk: bool) -> None:
        while self.pos < len(self.chunks):
            chunk = self.chunks[self.pos]
            part = self.waiting.pop(chunk, None)
            if part is None:
                if not (everything_on_disk or chunk in self.on_disk):
                    return
                part = self.workdir.read_part(chunk)
            self.skipped.append(part["skipped"])
            if len(part["logits"]):
                self.writer.append(**{name: part[name] for name in PART_COLUMNS})
            self.pos += 1

    def finish(self) -> Path:
        """Append the remaining parts (all must exist now), add ``skipped``, mark complete and rename."""
        self._drain(everything_on_disk=True)
        if self.writer.rows == 0:
            raise EmptyBankError(f"no row to write to {self.writer.path}: every image was skipped.")
        skipped = np.sort(np.concatenate(self.skipped or [np.zeros(0, np.int64)])).astype(np.int64)
        # BankWriter has no hook for a dataset of another length than N; write it before finish() renames.
        self.writer.write_dataset("skipped", skipped)
        return self.writer.finish(extra_attrs=self.header.extra_attrs)

    def abort(self) -> None:
        self.writer.abort()


def write_virtual_bank(shards: list[Path], out: Path, *, overwrite: bool) -> Path:
    """A bank whose row datasets are HDF5 virtual datasets over ``shards`` (complete banks, in order).

    Attributes and the classifier are copied from the first shard; ``skipped`` is concatenated. Source
    files are referenced relative to ``out``'s directory, so the bank and its shards move together. If a
    shard goes missing, its rows read as NaN features/logits and label -2, which BankReader rejects.
    """
    check_output_file(out, "--out", overwrite=overwrite)  # a new name, or a regular file with --overwrite
    sizes = []
    for shard in shards:
        with BankReader(shard) as reader:
            sizes.append(reader.info.num_rows)
    tmp = temporary_sibling(out)
    try:
        with h5py.File(shards[0], "r") as first, h5py.File(tmp, "w") as f:
            for key, value in first.attrs.items():
                f.attrs[key] = value
            f.attrs["complete"] = False
            for name in REQUIRED_DATASETS:
                tail, dtype = first[name].shape[1:], first[name].dtype
                layout = h5py.VirtualLayout(shape=(sum(sizes), *tail), dtype=dtype)
                start = 0
                for shard, size in zip(shards, sizes, strict=True):
                    if size:
                        source = h5py.VirtualSource(os.path.relpath(shard, out.parent), name, shape=(size, *tail), dtype=dtype)
                        layout[start : start + size] = source
                    start += size
                # Rows whose shard is missing read as the fill value: NaN / label -2 make BankReader refuse them.
                fill = np.nan if dtype.kind == "f" else (-2 if name == "labels" else 0)
                f.create_virtual_dataset(name, layout, fillvalue=fill)
            if "classifier" in first:
                first.copy(first["classifier"], f, "classifier")
            skipped = []
            for shard in shards:
                with h5py.File(shard, "r") as s:
                    skipped.append(s["skipped"][...])
            f.create_dataset("skipped", data=np.sort(np.concatenate(skipped)).astype(np.int64))
            f.attrs["assembly"] = "virtual"
            f.attrs["shards"] = json.dumps([os.path.relpath(s, out.parent) for s in shards])
            f.attrs["complete"] = True
        replace_with(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
