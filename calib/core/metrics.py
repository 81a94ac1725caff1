"""Evaluation metrics as pure functions over tensors.

All accuracies are fractions in [0, 1]. Shapes: logits (N, K), labels (N,) int64 in 0..K-1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from disalign.calib.defaults import FEW_BELOW, MANY_ABOVE  # noqa: F401  (re-exported)


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) float64: accuracy of each class; NaN for classes absent from ``labels``."""
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    return torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, math.nan))


def mean_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean of the per-class accuracies over the classes present in ``labels``."""
    acc = per_class_accuracy(predictions, labels, num_classes)
    return float(acc[~torch.isnan(acc)].mean())


def group_of_classes(class_counts: torch.Tensor, many_above: int = MANY_ABOVE, few_below: int = FEW_BELOW) -> dict[str, torch.Tensor]:
    """Boolean masks (K,) for the many (> many_above), medium and few (< few_below) training-count groups."""
    counts = torch.as_tensor(class_counts)
    many = counts > many_above
    few = counts < few_below
    return {"many": many, "medium": ~many & ~few, "few": few}


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """ECE with ``num_bins`` equal-width confidence bins: Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|."""
    confidence, prediction = probabilities.max(dim=1)
    correct = (prediction == labels).double()
    bins = torch.clamp((confidence.double() * num_bins).long(), max=num_bins - 1)  # right-closed, 1.0 in the last bin
    conf_sum = torch.bincount(bins, weights=confidence.double(), minlength=num_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=num_bins)
    return float((conf_sum - acc_sum).abs().sum() / labels.numel())


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin count, mean confidence and accuracy (NaN for empty bins), for reliability diagrams."""
    confidence, prediction = probabilities.max(dim=1)
    bins = torch.clamp((confidence.double() * num_bins).long(), max=num_bins - 1)
    count = torch.bincount(bins, minlength=num_bins).double()
    conf = torch.bincount(bins, weights=confidence.double(), minlength=num_bins) / count
    acc = torch.bincount(bins, weights=(prediction == labels).double(), minlength=num_bins) / count
    return {"count": count.tolist(), "confidence": conf.tolist(), "accuracy": acc.tolist()}


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy of the labels under softmax(logits)."""
    return float(F.cross_entropy(logits.double(), labels))


def classification_report(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: torch.Tensor,
    *,
    many_above: int = MANY_ABOVE,
    few_below: int = FEW_BELOW,
    num_bins: int = 15,
) -> dict[str, float | None]:
    """accuracy, mean_class_accuracy, many/medium/few (mean class accuracy per group; None when a group
    has no evaluated class), ece and nll over the labelled rows (label >= 0)."""
    keep = labels >= 0
    logits, labels = logits[keep].float(), labels[keep]
    num_classes = logits.shape[1]
    predictions = logits.argmax(dim=1)
    per_class = per_class_accuracy(predictions, labels, num_classes)
    report: dict[str, float | None] = {
        "accuracy": float((predictions == labels).double().mean()),
        "mean_class_accuracy": float(per_class[~torch.isnan(per_class)].mean()),
    }
    for name, mask in group_of_classes(class_counts, many_above, few_below).items():
        values = per_class[mask & ~torch.isnan(per_class)]
        report[name] = float(values.mean()) if values.numel() else None
    report["ece"] = expected_calibration_error(torch.softmax(logits, dim=1), labels, num_bins)
    report["nll"] = negative_log_likelihood(logits, labels)
    return report
