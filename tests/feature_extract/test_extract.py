"""The extraction job in-process on real CIFAR-10-LT rows: values, views, class counts, skips, refusals."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import pytest
import torch

from disalign.calib.data.bank import load_bank
from disalign.calib.errors import DisalignError
from disalign.feature_extract.errors import ExtractError, ImageDecodeError
from disalign.feature_extract.extract import ExtractConfig, extract_bank
from disalign.feature_extract.preprocess import Preprocessing, clean_view, decode_image
from disalign.feature_extract.workdir import WorkDir

from .conftest import CARD, MODEL, load_script

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _config(tmp_path, cifar_root, list_file, **kw) -> ExtractConfig:
    args = dict(model=str(MODEL), card=CARD, root=cifar_root, list_file=list_file, out=tmp_path / "bank.h5",
                workers=0, batch_size=16, chunk_size=32, quiet=True)
    return ExtractConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def bank64(tmp_path_factory, cifar_root, small_lists):
    tmp = tmp_path_factory.mktemp("bank64")
    cfg = _config(tmp, cifar_root, small_lists["train64"], feature_dtype="float32")
    result = extract_bank(cfg)
    return cfg, result, load_bank(cfg.out)


def test_clean_view_equals_the_models_own_outputs(bank64, cifar_root):
    cfg, result, bank = bank64
    assert (result.rows, result.images, result.skipped) == (64, 64, [])
    assert bank.features.dtype == torch.float32 and bank.num_rows == 64
    prep = Preprocessing.from_card(CARD)
    paths = [line.split()[0] for line in cfg.list_file.read_text().splitlines()]
    pixels = torch.stack([clean_view(decode_image(cifar_root / p), prep) for p in paths])
    x = (pixels.float() / 255 - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    module = load_script(MODEL)
    with torch.inference_mode():
        features, logits = module.forward_features(x), module(x)
    assert (bank.features - features).abs().max().item() <= 1e-5
    assert (bank.logits - logits).abs().max().item() <= 1e-5
    assert torch.equal(bank.sample_index, torch.arange(64)) and torch.equal(bank.view, torch.zeros(64, dtype=torch.int16))
    assert torch.equal(bank.labels, torch.zeros(64, dtype=torch.int64))  # the first 64 training rows are airplanes


def test_bank_header(bank64):
    cfg, _, bank = bank64
    module = load_script(MODEL)
    assert torch.equal(bank.classifier_weight, module.fc.weight.detach()) and torch.equal(bank.classifier_bias, module.fc.bias.detach())
    info = bank.info
    assert info.class_names == CIFAR_CLASSES and info.num_views == 1
    assert info.class_counts.tolist() == [64] + [0] * 9  # counted from this (training) list's labels
    assert info.model_fingerprint.startswith("sha256:6d652ed2")
    assert info.preprocessing["crop"] == [32, 32] and info.preprocessing["resize"] is None and info.preprocessing["views"] == 1
    assert bank.skipped.tolist() == []
    assert not WorkDir(cfg.out).path.exists()  # the parts are deleted once the bank is complete


def test_float16_default_and_workers_give_identical_banks(tmp_path, cifar_root, small_lists, bank64):
    a = extract_bank(_config(tmp_path, cifar_root, small_lists["train16"], out=tmp_path / "a.h5"))
    b = extract_bank(_config(tmp_path, cifar_root, small_lists["train16"], out=tmp_path / "b.h5", workers=2))
    bank_a, bank_b = load_bank(a.path), load_bank(b.path)
    assert bank_a.features.dtype == torch.float16
    assert torch.equal(bank_a.features, bank_b.features) and torch.equal(bank_a.logits, bank_b.logits)
    assert torch.equal(bank_a.features, bank64[2].features[:16].half())


def test_views(tmp_path, cifar_root, small_lists, bank64):
    cfg = _config(tmp_path, cifar_root, small_lists["train16"], views=3, seed=5, feature_dtype="float32")
    bank = load_bank(extract_bank(cfg).path)
    assert bank.num_rows == 48 and bank.info.num_views == 3
    assert bank.view.tolist()[:6] == [0, 1, 2, 0, 1, 2] and bank.sample_index.tolist()[:6] == [0, 0, 0, 1, 1, 1]
    clean = bank.view == 0
    assert torch.allclose(bank.features[clean], bank64[2].features[:16], atol=1e-5)
    assert (bank.features[bank.view == 1] - bank64[2].features[:16]).abs().max() > 0.1  # augmented views differ
    again = load_bank(extract_bank(dataclasses.replace(cfg, out=tmp_path / "again.h5")).path)
    assert torch.equal(again.features, bank.features)  # augmentations are seeded by (seed, row, view)
    assert bank.info.preprocessing["augmentation"] == "pad4-crop-flip"
    # The official stage-2 recipe: the same clean view, other augmented views, and the bank says which.
    official = load_bank(extract_bank(dataclasses.replace(cfg, out=tmp_path / "official.h5", augment="official")).path)
    assert official.info.preprocessing["augmentation"] == "official-random-resized-crop-flip-color-jitter"
    assert torch.equal(official.features[clean], bank.features[clean])
    assert (official.features[official.view == 1] - bank.features[bank.view == 1]).abs().max() > 0.1


def test_class_counts_from_a_bank_or_a_card(tmp_path, cifar_root, small_lists, bank64):
    from_bank = extract_bank(_config(tmp_path, cifar_root, small_lists["val20"], out=tmp_path / "v1.h5", class_counts_from=bank64[0].out))
    assert load_bank(from_bank.path).info.class_counts.tolist() == [64] + [0] * 9
    from_card = extract_bank(_config(tmp_path, cifar_root, small_lists["val20"], out=tmp_path / "v2.h5", class_counts_from=CARD))
    bank = load_bank(from_card.path)
    assert bank.info.class_counts.tolist() == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
    assert bank.num_rows == 20 and np.bincount(bank.labels.numpy()).tolist() == [2] * 10


@pytest.fixture
def damaged_root(tmp_path, cifar_root):
    """Six real JPEGs, one truncated JPEG and one missing file, listed in that mixed order."""
    root = tmp_path / "damaged"
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(6):
        shutil.copy(cifar_root / "test" / "cat" / f"{i:04d}.jpg", root / "img" / f"{i}.jpg")
        lines.append(f"img/{i}.jpg 3")
    (root / "img" / "bad.jpg").write_bytes((cifar_root / "test" / "cat" / "0009.jpg").read_bytes()[:200])
    lines.insert(2, "img/bad.jpg 3")
    lines.insert(5, "img/missing.jpg 3")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root


def test_bad_images_are_skipped_logged_and_listed(tmp_path, damaged_root, caplog):
    cfg = _config(tmp_path, damaged_root, damaged_root / "list.txt", batch_size=4, chunk_size=4)
    with caplog.at_level(logging.WARNING, logger="feature_extract"):
        result = extract_bank(cfg)
    assert result.skipped == [2, 5]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("skipped list row 2 (img/bad.jpg): image ") and "could not be decoded" in warnings[0]
    assert warnings[1].startswith("skipped list row 5 (img/missing.jpg): image ") and warnings[1].endswith("does not exist.")
    bank = load_bank(result.path)
    assert bank.sample_index.tolist() == [0, 1, 3, 4, 6, 7] and bank.skipped.tolist() == [2, 5]


def test_strict_aborts_on_the_first_bad_image(tmp_path, damaged_root):
    cfg = _config(tmp_path, damaged_root, damaged_root / "list.txt", batch_size=4, chunk_size=4, strict=True)
    with pytest.raises(ImageDecodeError, match=r"list row 2 \(img/bad.jpg\): image .* could not be decoded .*--strict stops at the first bad image"):
        extract_bank(cfg)
    assert not cfg.out.exists()


def test_folder_input_uses_the_card_class_names(tmp_path, cifar_root):
    for name in ("truck", "cat"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        shutil.copy(cifar_root / "test" / name / "0000.jpg", tmp_path / "tree" / name / "a.jpg")
    cfg = ExtractConfig(model=str(MODEL), card=CARD, folder=tmp_path / "tree", out=tmp_path / "f.h5", workers=0, quiet=True)
    bank = load_bank(extract_bank(cfg).path)
    assert bank.labels.tolist() == [3, 9] and bank.info.class_names == CIFAR_CLASSES


def test_refuses_to_overwrite_a_complete_bank(tmp_path, cifar_root, small_lists, bank64):
    cfg = _config(tmp_path, cifar_root, small_lists["val20"], out=bank64[0].out)
    with pytest.raises(DisalignError, match=r"--out .*bank.h5 already exists; pass --overwrite to replace it"):
        extract_bank(cfg)
    copy = tmp_path / "copy.h5"
    shutil.copy(bank64[0].out, copy)
    extract_bank(dataclasses.replace(cfg, out=copy, overwrite=True))
    assert load_bank(copy).num_rows == 20


def test_refuses_to_resume_with_other_arguments(tmp_path, cifar_root, small_lists):
    cfg = _config(tmp_path, cifar_root, small_lists["train64"])
    WorkDir(cfg.out).path.mkdir()
    (WorkDir(cfg.out).path / "manifest.json").write_text('{"version": 1, "batch_size": 8, "model": "other.ts"}')
    with pytest.raises(ExtractError, match=r"bank.h5.parts holds an unfinished extraction started with different arguments \(batch_size: 8 → 16; .*rerun with the same arguments to resume, or delete .*bank.h5.parts to start over"):
        extract_bank(cfg)


def test_input_errors(tmp_path, cifar_root, small_lists):
    bad = tmp_path / "labels.txt"
    bad.write_text("train/airplane/0000.jpg 0\ntrain/airplane/0001.jpg 12\n")
    with pytest.raises(ExtractError, match=r"list row 1 \(train/airplane/0001.jpg\) has label 12, but the model has 10 classes \(labels 0..9 or -1\)"):
        extract_bank(_config(tmp_path, cifar_root, bad))
    with pytest.raises(ExtractError, match=r"give exactly one image source: --list LIST.txt \(with --root DIR\) or --folder DIR"):
        ExtractConfig(model=str(MODEL), out=tmp_path / "x.h5")
    with pytest.raises(ExtractError, match=r"--list needs --root DIR"):
        ExtractConfig(model=str(MODEL), out=tmp_path / "x.h5", list_file=bad)
    with pytest.raises(ExtractError, match=r"--views should be >= 1 \(view 0 is the clean view\), found 0"):
        _config(tmp_path, cifar_root, bad, views=0)
    with pytest.raises(ExtractError, match=r"--augment should be one of standard, official, found 'strong'"):
        _config(tmp_path, cifar_root, bad, augment="strong")
    with pytest.raises(ExtractError, match=r"--class-counts-from .*card.json: the card has no 'class_counts' field"):
        (tmp_path / "card.json").write_text('{"input": {}}')
        extract_bank(_config(tmp_path, cifar_root, small_lists["train64"], class_counts_from=tmp_path / "card.json"))
    if not torch.cuda.is_available():
        with pytest.raises(ExtractError, match=r"--device cuda was requested but torch.cuda.is_available\(\) is False"):
            extract_bank(_config(tmp_path, cifar_root, small_lists["train64"], device="cuda"))
