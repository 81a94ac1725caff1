"""Pixel-level evaluation: calibrated logit maps rebuilt from a dense pixel bank, upsampled as the model
upsamples its own logits, scored against the full-resolution masks.

    report = evaluate_segmentation(test_bank, {"stage-1": joint, "disalign": calib}, masks,
                                   class_counts=calib.meta_.class_counts)   # groups="auto": ADE20K slices or ratios

A dense bank (``disalign extract --task segmentation`` without ``--pixels-per-image``) holds every pixel
of every image's (h, w) feature map: ``sample_index`` = image, ``yx`` = position. Per method, the rows
are calibrated (the DisAlign head per pixel: its gate is a 1x1 conv on the pixel feature), put back
into (K, h, w) maps, upsampled to the mask's (H, W) with the bank's ``upsample`` setting (bilinear,
align_corners=False, as FCN / DeepLab and our examples do), and argmax'ed. Report (plain JSON):

    {"methods": {name: {"mIoU", "mAcc", "aAcc", "mIoU_head|body|tail", "mAcc_head|body|tail", "ece"}},
     "class_counts", "pixel_ratios", "head_above", "tail_below", "grouping": "ade20k-official" | "pixel-ratio",
     "groups": {group: [class ids]},
     "per_class_iou" / "per_class_accuracy": {name: [K values, None where undefined]},
     "reliability": {name: {"count", "confidence", "accuracy", "ece"}}, "num_images", "num_pixels",
     "many_above", "few_below"}   (the last two: the group boundaries as pixel counts, for disalign.calib.evaluation.plots)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from disalign.calib.core.dense_metrics import (
    HEAD_ABOVE,
    IGNORE_INDEX,
    TAIL_BELOW,
    class_groups,
    confusion_matrix,
    pixel_ratios,
    segmentation_report,
)
from disalign.calib.data.bank import Bank
from disalign.calib.errors import InputError
from disalign.calib.estimators.base import Calibrator
from disalign.calib.evaluation.evaluate import predict_in_blocks
from disalign.calib.progress import progress_bar


def dense_layout(bank: Bank) -> tuple[int, int, list[torch.Tensor]]:
    """(h, w, rows per image in raster order) of a dense segmentation bank; raises if it is not one."""
    info = bank.info
    if info.task != "segmentation":
        raise InputError(f"bank {info.path} has task '{info.task}'; pixel-level evaluation needs a segmentation bank.")
    if "yx" not in bank.extra:
        raise InputError(f"bank {info.path} has no 'yx' column; it was not written by disalign extract --task segmentation.")
    fmap = info.preprocessing.get("feature_map")
    if not (isinstance(fmap, list) and len(fmap) == 2):
        raise InputError(f"bank {info.path}: preprocessing.feature_map should be [h, w], found {fmap!r}.")
    h, w = int(fmap[0]), int(fmap[1])
    order = torch.argsort(bank.sample_index, stable=True)
    images, counts = torch.unique_consecutive(bank.sample_index[order], return_counts=True)
    if (counts != h * w).any() or (images != torch.arange(images.numel())).any():
        raise InputError(
            f"bank {info.path} is not dense: evaluation needs all {h}x{w} pixels of images 0..N-1 "
            "(extract it without --pixels-per-image)."
        )
    yx = bank.extra["yx"].long()
    groups = []
    for rows in order.split(counts.tolist()):
        flat = yx[rows, 0] * w + yx[rows, 1]
        groups.append(rows[torch.argsort(flat)])
    return h, w, groups


def _upsample(maps: torch.Tensor, size: tuple[int, int], mode: dict) -> torch.Tensor:
    """(K, h, w) → (K, H, W) as the model upsamples its logits."""
    align = mode.get("align_corners", False) if mode.get("mode", "bilinear") in ("bilinear", "bicubic") else None
    return F.interpolate(maps.unsqueeze(0), size=size, mode=mode.get("mode", "bilinear"), align_corners=align)[0]


def evaluate_segmentation(
    test: Bank,
    estimators: dict[str, Calibrator],
    masks: Sequence[np.ndarray] | Callable[[int], np.ndarray],
    *,
    class_counts: np.ndarray | list[int],
    head_above: float = HEAD_ABOVE,
    tail_below: float = TAIL_BELOW,
    groups: str = "auto",
    num_bins: int = 15,
    progress: bool = False,
) -> dict:
    """Scores of every estimator on full-resolution predictions (report layout: module docstring).

    masks: per image (H, W) int class ids with IGNORE_INDEX for unlabelled pixels, as a sequence or a
    function of the image index. class_counts (K,): training pixel counts, which define the groups
    (``groups``: "auto", "ade20k" or "ratio", see :func:`disalign.calib.core.dense_metrics.class_groups`).
    progress: a bar per image on a terminal's stderr (:func:`disalign.calib.progress.progress_bar`).
    """
    h, w, image_rows = dense_layout(test)
    k = test.num_classes
    counts = np.asarray(class_counts, dtype=np.int64)
    if counts.shape != (k,):
        raise InputError(f"class_counts should have shape ({k},) like the bank's logits, found {counts.shape}.")
    ratios = pixel_ratios(counts)
    grouping, group_masks = class_groups(counts, grouping=groups, head_above=head_above, tail_below=tail_below)
    if grouping == "ade20k-official":  # group boundaries as counts, for the plots: 20 head, 75 non-tail classes
        many_above, few_below = float(counts[20]), float(counts[74])
    else:
        many_above, few_below = head_above * int(counts.sum()), tail_below * int(counts.sum())
    mask_of = masks if callable(masks) else masks.__getitem__
    upsample = test.info.preprocessing.get("upsample") or {"mode": "bilinear", "align_corners": False}
    report: dict = {
        "methods": {}, "class_counts": counts.tolist(), "pixel_ratios": ratios.tolist(),
        "head_above": head_above, "tail_below": tail_below, "grouping": grouping,
        "groups": {g: torch.nonzero(m).flatten().tolist() for g, m in group_masks.items()},
        "per_class_iou": {}, "per_class_accuracy": {}, "reliability": {}, "num_images": len(image_rows), "num_pixels": 0,
        "many_above": many_above, "few_below": few_below,
    }
    calibrated = {}
    for name, estimator in estimators.items():
        estimator.check_compatible(num_classes=k, feature_dim=test.feature_dim, model_fingerprint=test.info.model_fingerprint,
                                   source=f"test bank {test.info.path}")
        calibrated[name] = predict_in_blocks(estimator, test.features, test.logits).float()  # (N, K)
    conf = {name: torch.zeros(k, k, dtype=torch.int64) for name in estimators}
    bins = {name: torch.zeros(3, num_bins, dtype=torch.float64) for name in estimators}  # count, Σ confidence, Σ correct
    for image, rows in enumerate(progress_bar(image_rows, enabled=progress, desc="scoring", unit="image")):
        mask = torch.as_tensor(np.asarray(mask_of(image)), dtype=torch.int64)  # (H, W)
        if mask.ndim != 2:
            raise InputError(f"mask of image {image} should be (H, W), found shape {tuple(mask.shape)}.")
        labelled = (mask != IGNORE_INDEX) & (mask >= 0) & (mask < k)
        report["num_pixels"] += int(labelled.sum())
        for name, logits in calibrated.items():
            maps = _upsample(logits[rows].T.reshape(k, h, w), tuple(mask.shape), upsample)  # (K, H, W)
            prob, pred = torch.softmax(maps, dim=0).max(dim=0)  # (H, W)
            conf[name] += confusion_matrix(pred, mask, k)
            b = torch.clamp((prob[labelled].double() * num_bins).long(), max=num_bins - 1)
            bins[name][0] += torch.bincount(b, minlength=num_bins)
            bins[name][1] += torch.bincount(b, weights=prob[labelled].double(), minlength=num_bins)
            bins[name][2] += torch.bincount(b, weights=(pred[labelled] == mask[labelled]).double(), minlength=num_bins)
    for name in estimators:
        scores = segmentation_report(conf[name], ratios, groups=group_masks)
        count, conf_sum, correct = bins[name]
        ece = float((conf_sum - correct).abs().sum() / max(float(count.sum()), 1.0))
        report["per_class_iou"][name] = scores.pop("per_class_iou")
        report["per_class_accuracy"][name] = scores.pop("per_class_accuracy")
        report["methods"][name] = {**scores, "ece": ece}
        nan_none = [None if c == 0 else v for c, v in zip(count.tolist(), (conf_sum / count.clamp(min=1)).tolist(), strict=True)]
        acc_none = [None if c == 0 else v for c, v in zip(count.tolist(), (correct / count.clamp(min=1)).tolist(), strict=True)]
        report["reliability"][name] = {"count": [int(c) for c in count.tolist()], "confidence": nan_none, "accuracy": acc_none, "ece": ece}
    return report


COLUMNS = (("mIoU", "mIoU"), ("mAcc", "mAcc"), ("aAcc", "aAcc"), ("mIoU_head", "IoU-head"), ("mIoU_body", "IoU-body"),
           ("mIoU_tail", "IoU-tail"), ("mAcc_head", "Acc-head"), ("mAcc_body", "Acc-body"), ("mAcc_tail", "Acc-tail"), ("ece", "ECE"))


def format_segmentation_table(report: dict) -> str:
    """One aligned text table, a row per method, percentages with one decimal ("-" for None)."""
    header = ["method", *(title for _, title in COLUMNS)]
    rows = [[name, *("-" if m.get(key) is None or math.isnan(m[key]) else f"{100 * m[key]:.1f}" for key, _ in COLUMNS)]
            for name, m in report["methods"].items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join([cells[0].ljust(widths[0]), *(c.rjust(wd) for c, wd in zip(cells[1:], widths[1:], strict=True))])  # noqa: E731
    return "\n".join([line(header), line(["-" * wd for wd in widths]), *(line(r) for r in rows)])
