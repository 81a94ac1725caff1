"""Segmentation metrics: hand-computed answers, an independent (mmsegmentation-style) implementation, and
scikit-learn's jaccard_score where it is installed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from disalign.calib.core.dense_metrics import (
    class_groups,
    confusion_matrix,
    nanmean,
    per_class_iou,
    per_class_pixel_accuracy,
    pixel_ratios,
    ratio_groups,
    segmentation_report,
)
from disalign.calib.errors import InputError

# 3 classes on a 3x4 image; 255 = ignore.
LABELS = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255], [2, 2, 2, 255]])
PREDS = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 0], [2, 2, 0, 1]])


def mmseg_intersect_and_union(pred: np.ndarray, label: np.ndarray, k: int, ignore: int = 255):
    """mmsegmentation's intersect_and_union, written with histograms over the kept pixels."""
    keep = label != ignore
    pred, label = pred[keep], label[keep]
    intersect = pred[pred == label]
    area_i = np.histogram(intersect, bins=k, range=(0, k - 1))[0]
    area_p = np.histogram(pred, bins=k, range=(0, k - 1))[0]
    area_l = np.histogram(label, bins=k, range=(0, k - 1))[0]
    return area_i, area_p + area_l - area_i, area_l


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(PREDS, LABELS, 3)
    # class 0: 4 pixels → 3 right, 1 as 1; class 1: 3 pixels → 2 right, 1 as 2; class 2: 3 pixels → 2 right, 1 as 0
    assert conf.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]


def test_iou_and_accuracy_by_hand():
    conf = confusion_matrix(PREDS, LABELS, 3)
    iou = per_class_iou(conf)
    # IoU_0 = 3 / (4 + 4 - 3) = 0.6; IoU_1 = 2 / (3 + 3 - 2) = 0.5; IoU_2 = 2 / (3 + 3 - 2) = 0.5
    assert iou.tolist() == pytest.approx([0.6, 0.5, 0.5])
    assert per_class_pixel_accuracy(conf).tolist() == pytest.approx([0.75, 2 / 3, 2 / 3])
    report = segmentation_report(conf, np.array([0.5, 0.005, 0.0005]))
    assert report["mIoU"] == pytest.approx(1.6 / 3)
    assert report["mAcc"] == pytest.approx((0.75 + 4 / 3) / 3)
    assert report["aAcc"] == pytest.approx(7 / 10)
    assert (report["mIoU_head"], report["mIoU_body"], report["mIoU_tail"]) == pytest.approx((0.6, 0.5, 0.5))


def test_agrees_with_mmseg_formula_on_random_maps():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 6, size=(4, 17, 23))
    label[rng.random(label.shape) < 0.1] = 255
    label[label == 4] = 5  # class 4 absent from the labels
    pred = rng.integers(0, 6, size=label.shape)
    pred[pred == 3] = 2  # class 3 never predicted
    area_i, area_u, area_l = mmseg_intersect_and_union(pred, label, 6)
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), 6)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected_iou, expected_acc = area_i / area_u, area_i / area_l
    np.testing.assert_allclose(per_class_iou(conf).numpy(), expected_iou, equal_nan=True)
    np.testing.assert_allclose(per_class_pixel_accuracy(conf).numpy(), expected_acc, equal_nan=True)
    assert nanmean(per_class_iou(conf)) == pytest.approx(np.nanmean(expected_iou))


def test_agrees_with_sklearn_jaccard():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    label, pred = rng.integers(0, 5, size=500), rng.integers(0, 5, size=500)
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), 5)
    expected = metrics.jaccard_score(label, pred, average=None, labels=list(range(5)))
    np.testing.assert_allclose(per_class_iou(conf).numpy(), expected)


def test_absent_class_is_nan_and_left_out_of_means():
    conf = confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 3)
    iou = per_class_iou(conf)
    assert math.isnan(iou[2]) and nanmean(iou) == 1.0
    report = segmentation_report(conf, np.array([0.6, 0.4, 0.0]))
    assert report["mIoU_tail"] is None and report["per_class_iou"][2] is None


def test_ratio_groups_defaults_are_the_papers():
    groups = ratio_groups(np.array([0.2, 0.01, 0.005, 0.001, 0.0005]))
    assert groups["head"].tolist() == [True, False, False, False, False]
    assert groups["body"].tolist() == [False, True, True, True, False]
    assert groups["tail"].tolist() == [False, False, False, False, True]
    assert pixel_ratios([3, 1]).tolist() == [0.75, 0.25]


def test_errors_name_the_problem():
    with pytest.raises(InputError, match=r"same shape, found \(2,\) and \(3,\)"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(InputError, match=r"class ids in 0..1, found values in 0..5"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 2)
    with pytest.raises(InputError, match="tail_below <= head_above"):
        ratio_groups(np.array([0.5, 0.5]), head_above=0.01, tail_below=0.1)
    with pytest.raises(InputError, match="positive total"):
        pixel_ratios([0, 0])
    with pytest.raises(InputError, match=r"conf should be \(K, K\) and ratios \(K,\)"):
        segmentation_report(torch.zeros(2, 2, dtype=torch.long), np.array([1.0]))


# -- ADE20K's official groups ---------------------------------------------------------------------
def ade20k_counts() -> np.ndarray:
    """Training 'pixel counts' of a bank extracted with --class-stats on the real objectInfo150 table."""
    from disalign.feature_extract.segmentation import read_class_stats
    from tests.conftest import SHARED

    return read_class_stats(SHARED / "profiles" / "ade20k_objectInfo150.txt", 150)


@pytest.mark.shared_data  # the real ADE20K table in shared/profiles
def test_ade20k_statistics_get_the_official_index_slices():
    counts = ade20k_counts()
    grouping, groups = class_groups(counts)
    assert grouping == "ade20k-official"
    assert [torch.nonzero(groups[g]).flatten().tolist() for g in ("head", "body", "tail")] == [
        list(range(20)), list(range(20, 75)), list(range(75, 150))]
    # thresholds on the renormalised ratios would move class 20 into the head and class 75 out of the tail
    _, by_ratio = class_groups(counts, grouping="ratio")
    assert by_ratio["head"].sum() == 21 and bool(by_ratio["head"][20]) and not bool(by_ratio["tail"][75])
    # counts of ADE20K masks measured another way (±5 %) are still ADE20K's
    noisy = counts * np.random.default_rng(0).uniform(0.95, 1.05, 150)
    assert class_groups(noisy)[0] == "ade20k-official"


@pytest.mark.shared_data
def test_other_statistics_keep_the_ratio_thresholds():
    counts = ade20k_counts()
    assert class_groups(counts[::-1].copy())[0] == "pixel-ratio"  # 150 classes, not ADE20K's order
    grouping, groups = class_groups(np.array([700, 200, 90, 10]), head_above=0.1, tail_below=0.05)
    assert grouping == "pixel-ratio" and [groups[g].tolist() for g in ("head", "body", "tail")] == [
        [True, True, False, False], [False, False, True, False], [False, False, False, True]]
    assert class_groups(np.arange(1, 151), grouping="ade20k")[0] == "ade20k-official"  # forced
    with pytest.raises(InputError, match=r"the ADE20K groups need the 150 ADE20K classes, found K=4\."):
        class_groups(np.ones(4), grouping="ade20k")
    with pytest.raises(InputError, match=r"grouping should be one of auto, ade20k, ratio, found 'x'\."):
        class_groups(np.ones(4), grouping="x")


def test_segmentation_report_uses_the_groups_it_is_given():
    conf = torch.diag(torch.tensor([5, 0, 3]))  # classes 0 and 2 perfect, class 1 absent
    groups = {"head": torch.tensor([True, False, False]), "body": torch.tensor([False, True, False]),
              "tail": torch.tensor([False, False, True])}
    report = segmentation_report(conf, np.array([0.5, 0.3, 0.2]), groups=groups)
    assert (report["mIoU_head"], report["mIoU_body"], report["mIoU_tail"]) == (1.0, None, 1.0)
