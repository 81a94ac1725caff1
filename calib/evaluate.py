"""Evaluate fitted calibrations side by side on a test bank, and fit the baselines by name.

    estimators = {"disalign": load_calibration("calib_dir"), **fit_baselines(["joint", "lws"], train, val)}
    report = evaluate_methods(test, estimators, class_counts=train.training_class_counts())
    print(format_table(report))

Only the clean view (``view == 0``) and labelled rows (``label >= 0``) of the test bank are evaluated.
Accuracies are fractions in [0, 1]; many / medium / few are mean class accuracies over the classes with
more than ``many_above``, between, and fewer than ``few_below`` training examples (None for a group with
no evaluated class). The report is plain JSON (floats, lists, None):

    {"methods": {name: {"accuracy", "mean_class_accuracy", "many", "medium", "few", "ece", "nll"}},
     "class_counts": [K ints], "num_rows": int, "many_above": int, "few_below": int,
     "per_class_accuracy": {name: [K floats, None for classes absent from the test bank]},
     "reliability": {name: {"count", "confidence", "accuracy": [num_bins values, None for empty bins], "ece"}}}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from calib.bank import Bank
from calib.baselines import BASELINES
from calib.errors import InputError
from calib.estimator import Calibrator, as_bank
from calib.metrics import FEW_BELOW, MANY_ABOVE, classification_report, per_class_accuracy, reliability_bins

PREDICT_BLOCK_ROWS = 16384
COLUMNS = (  # (report key, header, kind)
    ("accuracy", "acc", "percent"),
    ("mean_class_accuracy", "mean-cls", "percent"),
    ("many", "many", "percent"),
    ("medium", "medium", "percent"),
    ("few", "few", "percent"),
    ("ece", "ECE", "percent"),
    ("nll", "NLL", "plain"),
)


def _none_for_nan(values: Sequence[float]) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]


def predict_in_blocks(estimator: Calibrator, features: torch.Tensor, logits: torch.Tensor, block_rows: int | None = None) -> torch.Tensor:
    """Calibrated logits (N, K) of features (N, d) and logits (N, K), ``block_rows`` (default
    :data:`PREDICT_BLOCK_ROWS`) rows at a time to bound the memory of large test banks."""
    block_rows = block_rows or PREDICT_BLOCK_ROWS
    parts = [estimator.predict_logits(features[s : s + block_rows], logits[s : s + block_rows]) for s in range(0, logits.shape[0], block_rows)]
    return torch.cat(parts) if parts else torch.empty(0, logits.shape[1])


def evaluate_methods(
    test: Bank,
    estimators: dict[str, Calibrator],
    *,
    class_counts: np.ndarray,
    many_above: int = MANY_ABOVE,
    few_below: int = FEW_BELOW,
    num_bins: int = 15,
) -> dict:
    """Metrics of every estimator on the clean labelled rows of ``test`` (report layout: module docstring).

    class_counts (K,): the training counts that define the many / medium / few groups.
    """
    test = as_bank(test, "test")
    counts = np.asarray(class_counts)
    if counts.shape != (test.num_classes,):
        raise InputError(f"class_counts should have shape ({test.num_classes},) like the test bank's logits, found {counts.shape}.")
    if not np.issubdtype(counts.dtype, np.number) or (counts < 0).any():
        raise InputError("class_counts should hold non-negative numbers, found negative or non-numeric values.")
    if few_below > many_above + 1:
        raise InputError(f"few_below should be at most many_above + 1, found few_below={few_below} and many_above={many_above}.")
    if num_bins < 1:
        raise InputError(f"num_bins should be >= 1, found {num_bins}.")
    keep = (test.view == 0) & (test.labels >= 0)
    if not bool(keep.any()):
        raise InputError(f"test bank {test.info.path} has no labelled rows in its clean view (view 0).")
    features, logits, labels = test.features[keep], test.logits[keep], test.labels[keep]
    counts_t = torch.as_tensor(counts.astype(np.int64))
    report: dict = {
        "methods": {},
        "class_counts": [int(c) for c in counts],
        "num_rows": int(labels.numel()),
        "many_above": many_above,
        "few_below": few_below,
        "per_class_accuracy": {},
        "reliability": {},
    }
    for name, estimator in estimators.items():
        estimator.check_compatible(num_classes=test.num_classes, feature_dim=test.feature_dim,
                                   model_fingerprint=test.info.model_fingerprint, source=f"test bank {test.info.path}")
        calibrated = predict_in_blocks(estimator, features, logits).float()
        metrics = classification_report(calibrated, labels, counts_t, many_above=many_above, few_below=few_below, num_bins=num_bins)
        report["methods"][name] = metrics
        report["per_class_accuracy"][name] = _none_for_nan(per_class_accuracy(calibrated.argmax(1), labels, test.num_classes).tolist())
        bins = reliability_bins(torch.softmax(calibrated, dim=1), labels, num_bins)
        report["reliability"][name] = {
            "count": [int(c) for c in bins["count"]],
            "confidence": _none_for_nan(bins["confidence"]),
            "accuracy": _none_for_nan(bins["accuracy"]),
            "ece": metrics["ece"],
        }
    return report


def fit_baselines(names: list[str], train: Bank, val: Bank | None, *, seed: int = 0) -> dict[str, Calibrator]:
    """Fit the named baselines (default hyper-parameters; ``seed`` for the SGD ones) → {name: estimator}.

    Every name is checked before any fit; the error lists the valid names.
    """
    for name in names:
        if name not in BASELINES:
            raise InputError(f"baseline should be one of {', '.join(BASELINES)}, found {name!r}.")
    train_bank = as_bank(train, "train")
    val_bank = as_bank(val, "val") if val is not None else None
    fitted: dict[str, Calibrator] = {}
    for name in dict.fromkeys(names):
        cls = BASELINES[name]
        estimator = cls(seed=seed) if "seed" in getattr(cls, "hyperparameter_names", ()) else cls()
        fitted[name] = estimator.fit(train_bank, val_bank)
    return fitted


def _cell(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if kind == "percent" else f"{value:.3f}"


def format_table(report: dict) -> str:
    """One aligned text table, a row per method: percentages with one decimal (NLL as is), "-" for None."""
    header = ["method", *(title for _, title, _ in COLUMNS)]
    rows = [[name, *(_cell(metrics.get(key), kind) for key, _, kind in COLUMNS)] for name, metrics in report["methods"].items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


__all__ = ["evaluate_methods", "fit_baselines", "format_table", "predict_in_blocks"]
