import json
import os
import stat
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from disalign.calib.data.bank import BankWriter, load_bank, open_bank, write_bank
from disalign.calib.errors import BankError
from tests.conftest import REPO


def small_arrays(n=5, d=4, k=3):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, k)).astype(np.float32), np.arange(n) % k


def test_round_trip_keeps_values_dtypes_and_attributes(tmp_path):
    x, z, y = small_arrays()
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_bank(tmp_path / "b.h5", x, z, y, class_names=["a", "b", "c"], class_counts=[5, 3, 1], model_fingerprint="sha256:abc",
               classifier_weight=w, classifier_bias=np.ones(3), preprocessing={"size": [32, 32]}, chunk_rows=2)
    bank = load_bank(tmp_path / "b.h5")
    assert bank.features.dtype == torch.float16  # float16 by default
    assert torch.allclose(bank.features.float(), torch.from_numpy(x), atol=2e-3)
    assert torch.equal(bank.logits, torch.from_numpy(z))
    assert bank.labels.tolist() == [0, 1, 2, 0, 1]
    assert bank.sample_index.tolist() == [0, 1, 2, 3, 4] and bank.view.dtype == torch.int16
    info = bank.info
    assert (info.num_rows, info.feature_dim, info.num_classes, info.chunk_rows) == (5, 4, 3, 2)
    assert info.class_names == ["a", "b", "c"] and info.class_counts.tolist() == [5, 3, 1]
    assert info.model_fingerprint == "sha256:abc" and info.preprocessing == {"size": [32, 32]}
    assert info.producer.startswith("disalign ") and info.created
    assert torch.equal(bank.classifier_weight, torch.from_numpy(w)) and bank.classifier_bias.tolist() == [1, 1, 1]


def test_float32_features_on_request(tmp_path):
    x, z, y = small_arrays()
    write_bank(tmp_path / "b.h5", x, z, y, feature_dtype="float32")
    assert torch.equal(load_bank(tmp_path / "b.h5").features, torch.from_numpy(x))


def test_training_counts_fall_back_to_clean_view_labels(tmp_path):
    x, z, _ = small_arrays(n=6)
    write_bank(tmp_path / "b.h5", x, z, np.array([0, 0, 1, 1, 2, -1]), view=np.array([0, 1, 0, 1, 0, 0]))
    assert load_bank(tmp_path / "b.h5").training_class_counts().tolist() == [1, 1, 1]


def test_streaming_blocks_cover_all_rows(tmp_path):
    x, z, y = small_arrays(n=11)
    write_bank(tmp_path / "b.h5", x, z, y, chunk_rows=2)
    with open_bank(tmp_path / "b.h5") as reader:
        blocks = list(reader.iter_blocks(block_rows=4))
    assert [start for start, _ in blocks] == [0, 4, 8]
    assert np.array_equal(np.concatenate([b["logits"] for _, b in blocks]), z)


def read_into(reader, start, stop):
    out = {"features": np.full((stop - start, reader.info.feature_dim), np.nan, dtype=reader.info.feature_dtype),
           "logits": np.full((stop - start, reader.info.num_classes), np.nan, dtype=np.float32),
           "labels": np.full(stop - start, -7, dtype=np.int64)}
    reader.read_rows_into(start, stop, out)
    return out


@pytest.mark.parametrize(("start", "stop"), [(0, 64), (64, 1000), (0, 1000), (960, 1000), (10, 300)])
def test_chunks_read_from_the_file_directly_equal_hdf5s_read(start, stop, tmp_path):
    """Whole chunks of an unfiltered bank are read with preadv (the partial last chunk included); a start
    inside a chunk and a compressed copy go through h5py: every way gives HDF5's own values."""
    rng = np.random.default_rng(0)
    x, z, y = rng.normal(size=(1000, 24)).astype(np.float16), rng.normal(size=(1000, 7)).astype(np.float32), rng.integers(0, 7, 1000)
    write_bank(tmp_path / "b.h5", x, z, y, chunk_rows=64, feature_dtype="float16")
    with h5py.File(tmp_path / "b.h5") as src, h5py.File(tmp_path / "gz.h5", "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            if isinstance(src[name], h5py.Dataset) and src[name].ndim >= 1 and src[name].shape[0] == 1000:
                dst.create_dataset(name, data=src[name][...], chunks=src[name].chunks, compression="gzip")
            else:
                src.copy(name, dst)
    for path, direct in ((tmp_path / "b.h5", start % 64 == 0), (tmp_path / "gz.h5", False)):
        with open_bank(path) as reader:
            got = read_into(reader, start, stop)
            assert (reader._fd is not None) == direct  # the file was opened for direct reads only when they apply
        assert np.array_equal(got["features"], x[start:stop]) and np.array_equal(got["logits"], z[start:stop])
        assert np.array_equal(got["labels"], y[start:stop])


def test_writer_never_overwrites_and_leaves_nothing_on_failure(tmp_path):
    x, z, y = small_arrays()
    write_bank(tmp_path / "b.h5", x, z, y)
    with pytest.raises(BankError, match="already exists; pass overwrite"):
        write_bank(tmp_path / "b.h5", x, z, y)
    with pytest.raises(BankError, match=r"column 'logits' should have shape \(5, 3\), found \(5, 2\)"):
        write_bank(tmp_path / "c.h5", x, z[:, :2], y, class_names=["a", "b", "c"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.h5"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_counts": [5, 3]}, r"^class_counts has 2 entries, expected K=3\.$"),
        ({"class_counts": [5, -3, 1]}, r"^class_counts should be counts >= 0, found -3\.$"),
        ({"classifier_weight": np.zeros((3, 5))}, r"^classifier_weight should have shape \(3, 4\), found \(3, 5\)\.$"),
        ({"classifier_weight": np.zeros((3, 4)), "classifier_bias": np.zeros(2)},
         r"^classifier_bias should have shape \(3,\), found \(2,\)\.$"),
    ],
)
def test_a_refused_writer_creates_no_file_and_no_directory(tmp_path, kwargs, message):
    """Everything is validated before the temporary file (and the bank's folder) is created: a refused
    construction has nothing to clean up, not even a ``.partial`` file the caller never got a writer for."""
    with pytest.raises(BankError, match=message):
        BankWriter(tmp_path / "banks" / "b.h5", feature_dim=4, class_names=["a", "b", "c"], **kwargs)
    assert list(tmp_path.rglob("*")) == []


def test_unfinished_bank_is_not_readable_as_complete(tmp_path):
    x, z, y = small_arrays()
    writer = BankWriter(tmp_path / "b.h5", feature_dim=4, class_names=["a", "b", "c"])
    writer.append(features=x, logits=z, labels=y, sample_index=np.arange(5), view=np.zeros(5))
    writer._file.flush()
    assert not (tmp_path / "b.h5").exists()
    with pytest.raises(BankError, match="is not a complete bank"):
        open_bank(writer.temporary_path)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def corrupt(path, edit):
    with h5py.File(path, "r+") as f:
        edit(f)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.__delitem__("labels"), "required dataset 'labels' is missing"),
        (lambda f: (f.__delitem__("view"), f.create_dataset("view", data=np.zeros(4, np.int16))),
         "dataset 'view' has 4 rows but 'logits' has 5"),
        (lambda f: f["logits"].__setitem__((2, 1), np.nan), "dataset 'logits' has NaN or inf values in row 2"),
        (lambda f: f["features"].__setitem__((3, 0), np.inf), "dataset 'features' has NaN or inf values in row 3"),
        (lambda f: f["labels"].__setitem__(4, 3), r"'labels' has 3 in row 4; labels must be in 0..2"),
        (lambda f: f.attrs.__setitem__("class_names", '["a", "b"]'), "'class_names' has 2 names but the logits have K=3"),
        (lambda f: (f.__delitem__("logits"), f.create_dataset("logits", data=np.zeros((5, 3)))),
         "dataset 'logits' should have dtype float32, found float64"),
        (lambda f: f.attrs.__setitem__("schema_version", 7), "schema_version should be 1, found 7"),
    ],
)
def test_each_malformed_bank_fails_with_one_clear_sentence(tmp_path, edit, message):
    x, z, y = small_arrays()
    path = write_bank(tmp_path / "b.h5", x, z, y, class_names=["a", "b", "c"])
    corrupt(path, edit)
    with pytest.raises(BankError, match=message):
        load_bank(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(BankError, match="does not exist"):
        load_bank(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(BankError, match="is not a readable HDF5 file"):
        load_bank(tmp_path / "junk.h5")


# -- headers of the wrong type, huge declared shapes, files that are not files ------------------------------
def replace_dataset(f, name, **kwargs):
    del f[name]
    f.create_dataset(name, **kwargs)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.attrs.__setitem__("schema_version", "1"), "attribute 'schema_version' should be an integer, found string '1'"),
        (lambda f: f.attrs.__setitem__("num_views", "2"), "attribute 'num_views' should be an integer, found string '2'"),
        (lambda f: f.attrs.__setitem__("num_views", 0), "attribute 'num_views' should be >= 1, found 0"),
        (lambda f: f.attrs.__setitem__("background_index", "3"), "attribute 'background_index' should be an integer, found string '3'"),
        (lambda f: f.attrs.__setitem__("background_index", 3), r"'background_index' should be -1 \(none\) or a column in 0..2, found 3"),
        (lambda f: f.attrs.__setitem__("class_counts", "5,3,1"), "attribute 'class_counts' should be an integer array of K=3 counts, found string"),
        (lambda f: f.attrs.__setitem__("class_counts", np.array([5.0, 3.0, 1.0])), "should be an integer array of K=3 counts, found float64 array"),
        (lambda f: f.attrs.__setitem__("class_names", '"abc"'), r"'class_names' should be JSON text \(a list of 3 class names\), found str"),
        (lambda f: f.attrs.__setitem__("class_names", '[1, 2, 3]'), "attribute 'class_names' should hold strings, found"),
        (lambda f: f.attrs.__setitem__("class_names", np.array([1, 2, 3])), r"should be JSON text \(a list of 3 class names\), found int64 array"),
        (lambda f: f.attrs.__setitem__("preprocessing", "[]"), r"attribute 'preprocessing' should be JSON text \(an object\), found list"),
        (lambda f: f.attrs.__setitem__("task", 3), "attribute 'task' should be a string, found int64 3"),
        (lambda f: f.attrs.__setitem__("complete", "yes"), "is not a complete bank"),
        (lambda f: (f.__delitem__("features"), f.create_group("features")), "'features' should be a dataset, found a group"),
        (lambda f: f.create_dataset("skipped", data=np.array([b"row 3"])), "dataset 'skipped' should be a 1-D integer array"),
        (lambda f: f.create_dataset("file_name", data=np.array([b"a.jpg"] * 5)), "per-row dataset 'file_name' should hold numbers"),
        (lambda f: replace_dataset(f, "classifier/weight", data=np.zeros((2, 4), np.float32)),
         r"dataset 'classifier/weight' should be numbers of shape \(3, 4\), found float32 of shape \(2, 4\)"),
    ],
)
def test_each_header_of_the_wrong_type_fails_with_one_clear_sentence(tmp_path, edit, message):
    x, z, y = small_arrays()
    path = write_bank(tmp_path / "b.h5", x, z, y, class_names=["a", "b", "c"], class_counts=[5, 3, 1],
                      classifier_weight=np.zeros((3, 4)), classifier_bias=np.zeros(3))
    corrupt(path, edit)
    with pytest.raises(BankError, match=message):
        load_bank(path)


def crafted_bank(path, rows: int, *, virtual_source=None):
    """A gzip-compressed bank whose header declares ``rows`` rows and whose datasets store none of them
    (or, with ``virtual_source``, map them onto a file that does not exist)."""
    columns = {"features": ((64,), "float16", 0.0), "logits": ((10,), "float32", 0.0), "labels": ((), "int64", 0),
               "sample_index": ((), "int64", 0), "view": ((), "int16", 0)}
    with h5py.File(path, "w") as f:
        for name, (tail, dtype, fill) in columns.items():
            if virtual_source is None:
                f.create_dataset(name, shape=(rows, *tail), dtype=dtype, chunks=(1024, *tail), compression="gzip")
            else:
                layout = h5py.VirtualLayout(shape=(rows, *tail), dtype=dtype)
                layout[:] = h5py.VirtualSource(str(virtual_source), name, shape=(rows, *tail))
                f.create_virtual_dataset(name, layout, fillvalue=fill)
        f.attrs.update({"complete": True, "schema_version": 1, "class_names": json.dumps([f"c{i}" for i in range(10)]),
                        "num_views": 1, "task": "classification", "background_index": -1})
    return path


def test_a_small_file_declaring_1e11_rows_is_refused_before_any_allocation(tmp_path, capsys):
    from disalign.cli import main

    path = crafted_bank(tmp_path / "huge.h5", 10**11)
    assert path.stat().st_size < 64 * 1024  # a few KB that declare 15 TB of rows
    with pytest.raises(BankError, match=r"dataset 'features' declares 100000000000 rows but stores fewer; the file is truncated"):
        open_bank(path)
    assert main(["fit", str(path), "--out", str(tmp_path / "calib")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: dataset 'features' declares 100000000000 rows")


def test_a_bank_larger_than_the_available_memory_is_refused_with_a_sentence(tmp_path):
    from disalign.calib.data.bank import available_memory

    path = crafted_bank(tmp_path / "virtual.h5", 10**11, virtual_source=tmp_path / "absent-shard.h5")
    with open_bank(path) as reader:  # a virtual bank's rows live in other files: the header alone is fine
        assert reader.info.num_rows == 10**11 and reader.row_bytes() == 64 * 2 + 10 * 4 + 8 + 8 + 2
    gib = 10**11 * 186 / 2**30
    with pytest.raises(BankError, match=rf"declares 100000000000 rows, {gib:.1f} GiB in memory, more than the .* GiB available; "
                                        r"fit it streamed with --max-memory"):
        load_bank(path)
    assert available_memory() is not None and available_memory() < 10**11 * 186


def test_a_fifo_given_as_a_bank_is_refused_at_once(tmp_path):
    fifo = tmp_path / "train.h5"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer for ever
    result = subprocess.run([sys.executable, "-m", "disalign", "fit", str(fifo), "--out", str(tmp_path / "calib")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: bank file {fifo} is a FIFO, not a regular file."


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_bank_files_respect_the_umask(tmp_path, umask):
    x, z, y = small_arrays()
    previous = os.umask(umask)
    try:
        path = write_bank(tmp_path / "b.h5", x, z, y)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
