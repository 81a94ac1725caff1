"""disalign.calib.core.metrics against hand-computed values (K = 3 unless stated)."""

from __future__ import annotations

import math

import pytest
import torch

from disalign.calib.core.metrics import (
    classification_report,
    expected_calibration_error,
    group_of_classes,
    mean_class_accuracy,
    negative_log_likelihood,
    per_class_accuracy,
    reliability_bins,
)

# class 0: 2 of 3 right, class 1: 1 of 2, class 2: 1 of 1 → accuracy 4/6, mean-class (2/3 + 1/2 + 1)/3 = 13/18
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])
PREDICTIONS = torch.tensor([0, 0, 1, 1, 2, 2])


def one_hot_logits(predictions: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(predictions, num_classes).float() * 5.0


def test_per_class_and_mean_class_accuracy():
    acc = per_class_accuracy(PREDICTIONS, LABELS, 3)
    assert acc.tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert mean_class_accuracy(PREDICTIONS, LABELS, 3) == pytest.approx(13 / 18)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    acc = per_class_accuracy(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1]), 3)
    assert acc[:2].tolist() == [1.0, 0.5] and math.isnan(acc[2])
    assert mean_class_accuracy(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1]), 3) == pytest.approx(0.75)


def test_groups_split_on_training_counts():
    groups = group_of_classes(torch.tensor([500, 101, 100, 20, 19, 0]), many_above=100, few_below=20)
    assert groups["many"].tolist() == [True, True, False, False, False, False]
    assert groups["medium"].tolist() == [False, False, True, True, False, False]
    assert groups["few"].tolist() == [False, False, False, False, True, True]


def test_ece_on_a_hand_case():
    probs = torch.tensor([
        [0.9, 0.05, 0.05],  # label 0: right, confidence 0.9 (bin 13)
        [0.9, 0.1, 0.0],  # label 1: wrong, confidence 0.9 (bin 13)
        [0.5, 0.3, 0.2],  # label 0: right, confidence 0.5 (bin 7)
        [0.2, 0.2, 0.6],  # label 2: right, confidence 0.6 (bin 9)
    ])
    labels = torch.tensor([0, 1, 0, 2])
    # 2/4·|0.5 − 0.9| + 1/4·|1 − 0.5| + 1/4·|1 − 0.6| = 0.2 + 0.125 + 0.1
    assert expected_calibration_error(probs, labels, num_bins=15) == pytest.approx(0.425)
    bins = reliability_bins(probs, labels, num_bins=15)
    assert bins["count"][13] == 2 and bins["count"][7] == 1 and sum(bins["count"]) == 4
    assert bins["confidence"][13] == pytest.approx(0.9) and bins["accuracy"][13] == pytest.approx(0.5)
    assert math.isnan(bins["accuracy"][0])


def test_confidence_one_falls_in_the_last_bin():
    probs = torch.tensor([[1.0, 0.0, 0.0]])
    assert reliability_bins(probs, torch.tensor([0]), num_bins=15)["count"][14] == 1
    assert expected_calibration_error(probs, torch.tensor([0]), num_bins=15) == pytest.approx(0.0)


def test_nll_matches_hand_log_probabilities():
    # softmax([0, ln 2, 0]) = [1/4, 1/2, 1/4]: label 1 costs ln 2, label 0 costs ln 4
    logits = torch.tensor([[0.0, math.log(2), 0.0], [0.0, math.log(2), 0.0]])
    assert negative_log_likelihood(logits, torch.tensor([1, 0])) == pytest.approx(1.5 * math.log(2))


def test_classification_report_hand_case_with_unlabelled_rows():
    logits = torch.cat([one_hot_logits(PREDICTIONS), torch.zeros(2, 3)])
    labels = torch.cat([LABELS, torch.tensor([-1, -1])])  # unlabelled rows are ignored
    report = classification_report(logits, labels, torch.tensor([200, 50, 5]), many_above=100, few_below=20)
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["mean_class_accuracy"] == pytest.approx(13 / 18)
    assert (report["many"], report["medium"], report["few"]) == pytest.approx((2 / 3, 1 / 2, 1.0))
    p_top = math.exp(5) / (math.exp(5) + 2)  # confidence of every row; correct rows cost −log p_top
    assert report["nll"] == pytest.approx((4 * -math.log(p_top) + 2 * -math.log(1 / (math.exp(5) + 2))) / 6)
    assert report["ece"] == pytest.approx(abs(p_top - 4 / 6))


def test_classification_report_empty_group_is_none():
    report = classification_report(one_hot_logits(PREDICTIONS), LABELS, torch.tensor([200, 150, 50]))
    assert report["few"] is None
    assert report["many"] == pytest.approx((2 / 3 + 1 / 2) / 2) and report["medium"] == pytest.approx(1.0)
