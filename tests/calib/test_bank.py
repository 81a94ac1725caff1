import h5py
import numpy as np
import pytest
import torch

from calib.bank import BankWriter, load_bank, open_bank, write_bank
from calib.errors import BankError


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


def test_writer_never_overwrites_and_leaves_nothing_on_failure(tmp_path):
    x, z, y = small_arrays()
    write_bank(tmp_path / "b.h5", x, z, y)
    with pytest.raises(BankError, match="already exists; pass overwrite"):
        write_bank(tmp_path / "b.h5", x, z, y)
    with pytest.raises(BankError, match=r"column 'logits' should have shape \(5, 3\), found \(5, 2\)"):
        write_bank(tmp_path / "c.h5", x, z[:, :2], y, class_names=["a", "b", "c"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.h5"]


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
