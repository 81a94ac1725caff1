"""List files, image folders, the decoding dataset and its collate."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from disalign.feature_extract.data import ViewDataset, collate_views, read_list, scan_folder
from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.preprocess import Preprocessing

from .conftest import CARD, LISTS


def test_read_shared_lists(cifar_root):
    train = read_list(LISTS / "train.txt", cifar_root)
    assert len(train) == 13996 and train.labelled
    assert train.paths[0] == "train/airplane/0000.jpg" and train.labels[0] == 0
    assert np.bincount(train.labels).tolist() == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
    assert len(read_list(LISTS / "val.txt", cifar_root)) == 200 and len(read_list(LISTS / "test.txt", cifar_root)) == 9800


def test_labels_are_optional_and_comments_ignored(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("# header\na/1.jpg 3\n\nb/2.jpg\n  c/3.jpg -1  \n")
    images = read_list(path, tmp_path)
    assert images.paths == ["a/1.jpg", "b/2.jpg", "c/3.jpg"]
    assert images.labels.tolist() == [3, -1, -1] and not images.labelled


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a.jpg 1\nb.jpg cat\n", r"l.txt line 2: the label should be an integer, found 'cat'"),
        ("a.jpg 1\n\nb c.jpg 2\n", r"l.txt line 3: expected 'relative/path \[label\]' \(2 fields at most, no spaces in paths\), found 3 fields"),
        ("a.jpg -2\n", r"l.txt line 1: the label should be >= 0 \(or -1 for unlabelled\), found -2"),
        ("# only a comment\n", r"--list file .*l.txt has no image lines"),
    ],
)
def test_malformed_lists(tmp_path, text, match):
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(ExtractError, match=match):
        read_list(tmp_path / "l.txt", tmp_path)


def test_missing_list(tmp_path):
    with pytest.raises(ExtractError, match=r"--list file .*nope.txt does not exist"):
        read_list(tmp_path / "nope.txt", tmp_path)


@pytest.fixture
def tiny_folder(tmp_path, cifar_root):
    for name in ("truck", "cat"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(2):
            shutil.copy(cifar_root / "test" / name / f"{i:04d}.jpg", tmp_path / "tree" / name / f"{i}.jpg")
    (tmp_path / "tree" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path / "tree"


def test_scan_folder_sorted_classes(tiny_folder):
    images = scan_folder(tiny_folder)
    assert images.class_names == ["cat", "truck"]
    assert images.paths == ["cat/0.jpg", "cat/1.jpg", "truck/0.jpg", "truck/1.jpg"]
    assert images.labels.tolist() == [0, 0, 1, 1]
    cifar_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert scan_folder(tiny_folder, cifar_names).labels.tolist() == [3, 3, 9, 9]


def test_scan_folder_errors(tmp_path):
    with pytest.raises(ExtractError, match=r"--folder .*absent is not a directory"):
        scan_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExtractError, match=r"has no class sub-directories \(expected root/<class>/<image>\)"):
        scan_folder(tmp_path / "empty")
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(ExtractError, match=r"has no image files"):
        scan_folder(tmp_path / "empty")


def test_dataset_views_and_failures(tiny_folder):
    (tiny_folder / "cat" / "1.jpg").write_bytes(b"garbage")
    images = scan_folder(tiny_folder)
    dataset = ViewDataset(images, Preprocessing.from_card(CARD), views=3, seed=7)
    assert len(dataset) == 4
    good, bad = dataset[0], dataset[1]
    assert len(good.views) == 3 and good.views[0].shape == (32, 32, 3) and good.error is None
    assert bad.views is None and bad.error.startswith("list row 1 (cat/1.jpg): image ") and "could not be decoded" in bad.error
    batch = collate_views([dataset[i] for i in range(4)])
    assert batch["images"].shape == (9, 32, 32, 3) and batch["images"].dtype == torch.uint8
    assert batch["rows"].tolist() == [0, 2, 3] and batch["bad_rows"].tolist() == [1]
    assert np.array_equal(batch["images"][0].numpy(), good.views[0]) and np.array_equal(batch["images"][2].numpy(), good.views[2])
    again = ViewDataset(images, Preprocessing.from_card(CARD), views=3, seed=7)[0]
    assert all(np.array_equal(a, b) for a, b in zip(good.views, again.views, strict=True))
