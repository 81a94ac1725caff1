"""Semantic-segmentation metrics as pure functions over label maps and confusion matrices.

Conventions of mmsegmentation (and the DisAlign paper's Table 6):

    conf[i, j]  = number of pixels of true class i predicted as j (ignored pixels left out)
    IoU_c       = conf[c, c] / (Σ_j conf[c, j] + Σ_i conf[i, c] − conf[c, c])     NaN when the union is 0
    Acc_c       = conf[c, c] / Σ_j conf[c, j]                                    NaN when c has no pixel
    mIoU, mAcc  = means over the classes whose value is not NaN
    aAcc        = Σ_c conf[c, c] / Σ conf                                         (all-pixel accuracy)

Head / body / tail groups (:func:`class_groups`) are set on the *training* pixel ratio of each class:
head > ``head_above`` (1 % by default), tail < ``tail_below`` (0.1 %), body in between — except for
ADE20K, whose official split is the class slices 0–19 / 20–74 / 75–149 (:mod:`disalign.calib.core.ade20k`; thresholds
on the renormalised ratios would move two classes): ``grouping="auto"`` uses the slices when the class
statistics are ADE20K's, ``"ade20k"`` always (K must be 150), ``"ratio"`` never.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from disalign.calib.core import ade20k
from disalign.calib.defaults import GROUPINGS, HEAD_ABOVE, IGNORE_INDEX, TAIL_BELOW  # noqa: F401  (re-exported)
from disalign.calib.errors import InputError

GROUPS = ("head", "body", "tail")


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 confusion matrix of predicted vs true class ids.

    predictions, labels: integer tensors of the same shape (any number of dims); pixels whose label is
    ``ignore_index`` (or outside 0..K-1, e.g. negative) are left out; predictions must be in 0..K-1.
    """
    if predictions.shape != labels.shape:
        raise InputError(f"predictions and labels should have the same shape, found {tuple(predictions.shape)} and {tuple(labels.shape)}.")
    y = labels.reshape(-1).long()
    p = predictions.reshape(-1).long()
    keep = (y != ignore_index) & (y >= 0) & (y < num_classes)
    y, p = y[keep], p[keep]
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise InputError(f"predictions should be class ids in 0..{num_classes - 1}, found values in {int(p.min())}..{int(p.max())}.")
    return torch.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_iou(conf: torch.Tensor) -> torch.Tensor:
    """(K,) float64 IoU of each class from a (K, K) confusion matrix; NaN where the union is empty."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def per_class_pixel_accuracy(conf: torch.Tensor) -> torch.Tensor:
    """(K,) float64 pixel accuracy (recall) of each class; NaN for classes with no labelled pixel."""
    conf = conf.double()
    total = conf.sum(1)
    return torch.where(total > 0, conf.diag() / total.clamp(min=1), torch.full_like(total, math.nan))


def nanmean(values: torch.Tensor) -> float | None:
    """Mean of the non-NaN entries, None when there is none."""
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else None


def ratio_groups(pixel_ratios: np.ndarray | torch.Tensor, *, head_above: float = HEAD_ABOVE,
                 tail_below: float = TAIL_BELOW) -> dict[str, torch.Tensor]:
    """Boolean masks (K,): head (ratio > head_above), body, tail (ratio < tail_below)."""
    if not 0 <= tail_below <= head_above:
        raise InputError(f"the group thresholds should satisfy 0 <= tail_below <= head_above, found tail_below={tail_below} and head_above={head_above}.")
    r = torch.as_tensor(np.asarray(pixel_ratios, dtype=np.float64))
    head, tail = r > head_above, r < tail_below
    return {"head": head, "body": ~head & ~tail, "tail": tail}


def class_groups(class_counts: np.ndarray | list[int], *, grouping: str = "auto", head_above: float = HEAD_ABOVE,
                 tail_below: float = TAIL_BELOW) -> tuple[str, dict[str, torch.Tensor]]:
    """(name of the grouping used, boolean masks (K,) of head / body / tail) for training counts (K,).

    Names: ``"ade20k-official"`` (the index slices) or ``"pixel-ratio"`` (the thresholds).
    """
    if grouping not in GROUPINGS:
        raise InputError(f"grouping should be one of {', '.join(GROUPINGS)}, found {grouping!r}.")
    counts = np.asarray(class_counts).reshape(-1)
    if grouping == "ade20k" and counts.size != ade20k.NUM_CLASSES:
        raise InputError(f"the ADE20K groups need the {ade20k.NUM_CLASSES} ADE20K classes, found K={counts.size}.")
    if grouping == "ade20k" or (grouping == "auto" and ade20k.has_ade20k_statistics(counts)):
        return "ade20k-official", {name: torch.from_numpy(mask) for name, mask in ade20k.official_groups().items()}
    return "pixel-ratio", ratio_groups(pixel_ratios(counts), head_above=head_above, tail_below=tail_below)


def pixel_ratios(class_counts: np.ndarray | list[int]) -> np.ndarray:
    """Training pixel ratios (K,) float64 from per-class training pixel counts (K,)."""
    counts = np.asarray(class_counts, dtype=np.float64).reshape(-1)
    if (counts < 0).any() or counts.sum() <= 0:
        raise InputError("class_counts should be non-negative with a positive total.")
    return counts / counts.sum()


def segmentation_report(conf: torch.Tensor, ratios: np.ndarray, *, head_above: float = HEAD_ABOVE,
                        tail_below: float = TAIL_BELOW, groups: dict[str, torch.Tensor] | None = None) -> dict:
    """mIoU, mAcc, aAcc overall and per group, and the per-class values, from a (K, K) confusion matrix.

    ratios (K,): training pixel ratios, which define the head / body / tail groups unless ``groups``
    (boolean masks (K,), e.g. from :func:`class_groups`) are given. Fractions in [0, 1]; a group with no
    evaluated class gives None.
    """
    k = conf.shape[0]
    if conf.shape != (k, k) or np.asarray(ratios).shape != (k,):
        raise InputError(f"conf should be (K, K) and ratios (K,), found {tuple(conf.shape)} and {np.asarray(ratios).shape}.")
    iou, acc = per_class_iou(conf), per_class_pixel_accuracy(conf)
    total = int(conf.sum())
    report: dict = {
        "mIoU": nanmean(iou),
        "mAcc": nanmean(acc),
        "aAcc": float(conf.diag().sum()) / total if total else None,
    }
    if groups is None:
        groups = ratio_groups(ratios, head_above=head_above, tail_below=tail_below)
    for name, mask in groups.items():
        report[f"mIoU_{name}"] = nanmean(iou[mask])
        report[f"mAcc_{name}"] = nanmean(acc[mask])
    report["per_class_iou"] = [None if math.isnan(v) else v for v in iou.tolist()]
    report["per_class_accuracy"] = [None if math.isnan(v) else v for v in acc.tolist()]
    return report
