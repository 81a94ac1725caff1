"""Pixel-level evaluation: maps rebuilt from a dense bank agree with the model's own full-resolution output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from disalign.calib.core.dense_metrics import confusion_matrix, segmentation_report
from disalign.calib.data.bank import load_bank, write_bank
from disalign.calib.errors import InputError
from disalign.calib.estimators.disalign import DisAlign
from disalign.calib.evaluation.evaluate import fit_baselines
from disalign.calib.evaluation.segmentation import (
    dense_layout,
    evaluate_segmentation,
    format_segmentation_table,
)
from disalign.cli.evaluate_dense import add_parsers
from disalign.feature_extract.segmentation import (
    SegmentationExtractConfig,
    extract_segmentation_bank,
    read_pairs,
)
from tests.dense_data import seg_scenes, tiny_segmenter

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")  # torch >= 2.14 deprecates TorchScript


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    root = tmp_path_factory.mktemp("segeval")
    model = tiny_segmenter(root / "tiny.ts")
    card = model.with_suffix(".json")
    train_list, test_list = seg_scenes(root, 12, seed=1, name="train.txt"), seg_scenes(root / "test", 5, seed=2)
    train = extract_segmentation_bank(SegmentationExtractConfig(model=str(model), root=root, list_file=train_list,
                                                                out=root / "train.h5", card=card, pixels_per_image=8))
    test = extract_segmentation_bank(SegmentationExtractConfig(model=str(model), root=root / "test", list_file=test_list,
                                                               out=root / "test.h5", card=card, class_counts_from=train))
    return {"root": root, "model": model, "train": train, "test": test, "test_root": root / "test", "test_list": test_list}


def masks_of(root: Path, list_file: Path) -> list[np.ndarray]:
    return [np.array(Image.open(root / m)).astype(np.int64) for _, m in read_pairs(list_file)]


def test_stage1_maps_equal_the_models_own_upsampled_output(banks):
    test = load_bank(banks["test"])
    joint = fit_baselines(["joint"], test, None)["joint"]
    masks = masks_of(banks["test_root"], banks["test_list"])
    counts = test.info.class_counts
    report = evaluate_segmentation(test, {"joint": joint}, masks, class_counts=counts, head_above=0.5, tail_below=0.2)
    model = torch.jit.load(str(banks["model"]))
    images = torch.stack([torch.from_numpy(np.array(Image.open(banks["test_root"] / i))) for i, _ in read_pairs(banks["test_list"])])
    with torch.no_grad():
        predictions = model((images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25).argmax(1)  # (N, 16, 16)
    conf = confusion_matrix(predictions, torch.from_numpy(np.stack(masks)), 3)
    expected = segmentation_report(conf, counts / counts.sum(), head_above=0.5, tail_below=0.2)
    for key in ("mIoU", "mAcc", "aAcc", "mIoU_head", "mIoU_body", "mIoU_tail"):
        assert report["methods"]["joint"][key] == pytest.approx(expected[key])
    assert report["num_pixels"] == int(sum((m != 255).sum() for m in masks)) and report["num_images"] == 5


def test_disalign_is_applied_per_pixel_before_upsampling(banks):
    train, test = load_bank(banks["train"]), load_bank(banks["test"])
    est = DisAlign(rho=1.0, epochs=2, batch_size=16).fit(train)
    masks = masks_of(banks["test_root"], banks["test_list"])
    report = evaluate_segmentation(test, {"disalign": est}, masks, class_counts=train.info.class_counts)
    h, w, rows = dense_layout(test)
    conf = torch.zeros(3, 3, dtype=torch.int64)
    for image, r in enumerate(rows):
        z = est.predict_logits(test.features[r].float(), test.logits[r]).T.reshape(1, 3, h, w)
        pred = F.interpolate(z, size=masks[image].shape, mode="bilinear", align_corners=False)[0].argmax(0)
        conf += confusion_matrix(pred, torch.from_numpy(masks[image]), 3)
    assert report["methods"]["disalign"]["mIoU"] == pytest.approx(segmentation_report(conf, np.ones(3) / 3)["mIoU"])
    assert len(report["reliability"]["disalign"]["count"]) == 15
    assert "disalign" in format_segmentation_table(report)


def test_sampled_or_foreign_banks_are_refused(banks, tmp_path):
    with pytest.raises(InputError, match="is not dense: evaluation needs all 4x4 pixels"):
        dense_layout(load_bank(banks["train"]))
    plain = write_bank(tmp_path / "cls.h5", np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2, dtype=np.int64))
    with pytest.raises(InputError, match="has task 'classification'; pixel-level evaluation needs a segmentation bank"):
        dense_layout(load_bank(plain))


def test_eval_segmentation_command(banks, tmp_path, capsys):
    import argparse

    est = DisAlign(rho=1.0, epochs=1, batch_size=16).fit(banks["train"])
    est.save(tmp_path / "calib")
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["eval-segmentation", str(banks["test"]), "--calibration", str(tmp_path / "calib"),
                              "--root", str(banks["test_root"]), "--list", str(banks["test_list"]),
                              "--json", str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots")])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "mIoU" in captured.out and "IoU-tail" in captured.out
    assert "wrote 2 plots" in captured.err  # per-class and reliability (no ρ curve without --val)
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["methods"]) == {"joint", "disalign"} and len(report["per_class_iou"]["disalign"]) == 3
    assert report["provenance"]["inputs"]["list"]["path"] == str(banks["test_list"])
    assert report["grouping"] == "pixel-ratio" and "groups (pixel-ratio): head: " in captured.out
    # with the training pixel bank every method runs by default
    args = parser.parse_args(["eval-segmentation", str(banks["test"]), "--calibration", str(tmp_path / "calib"),
                              "--root", str(banks["test_root"]), "--list", str(banks["test_list"]), "--train", str(banks["train"]),
                              "--max-steps", "4", "--json", str(tmp_path / "all.json")])
    assert args.func(args) == 0
    assert list(json.loads((tmp_path / "all.json").read_text())["methods"]) == [
        "joint", "disalign", "logit-adjust", "tau-norm", "lws", "crt", "ncm", "tde"]
    short = tmp_path / "short.txt"
    short.write_text("\n".join(banks["test_list"].read_text().splitlines()[:2]) + "\n")
    args = parser.parse_args(["eval-segmentation", str(banks["test"]), "--calibration", str(tmp_path / "calib"),
                              "--root", str(banks["test_root"]), "--list", str(short)])
    with pytest.raises(InputError, match="has 2 image/mask pairs but the test bank was extracted from 5"):
        args.func(args)
