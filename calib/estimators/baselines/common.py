"""Shared pieces of the baselines: the hyper-parameter contract, clean-view rows, validation scoring,
the untouched background column.

Every baseline stores its ``__init__`` keyword hyper-parameters as given; ``get_params`` returns them
(from the signature, :class:`~disalign.calib.estimators.base.Calibrator`), so ``Calibrator.load`` can rebuild the
estimator with ``cls(**hp)``.
Validation-based choices (τ of logit adjustment and τ-norm) score the clean view (``view == 0``) of the
labelled validation rows: best mean-class accuracy, ties broken by lower NLL, then by grid order.

Banks with a background column (RoI banks, ``background_index`` set) get every baseline on the foreground
columns only: the background logit is the stage-1 one, as DisAlign leaves it (:func:`keep_background`),
and priors are foreground priors (the background count, 0 by convention, is not a class frequency).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from disalign.calib.core.metrics import mean_class_accuracy, negative_log_likelihood
from disalign.calib.data.bank import Bank, clean_labelled_rows
from disalign.calib.errors import InputError
from disalign.calib.estimators.base import Calibrator


class Baseline(Calibrator):
    """A :class:`Calibrator` of a baseline method (the hyper-parameter contract is the estimator's)."""


def clean_labelled(bank: Bank, role: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clean-view labelled rows of a bank: features (M, d) float32, logits (M, K), labels (M,); M >= 1."""
    keep = clean_labelled_rows(bank.view, bank.labels)
    if not bool(keep.any()):
        raise InputError(f"{role} bank {bank.info.path} has no labelled rows in its clean view (view 0).")
    return bank.features[keep].float(), bank.logits[keep], bank.labels[keep]


def keep_background(calibrated: torch.Tensor, logits: torch.Tensor, background_index: int | None) -> torch.Tensor:
    """``calibrated`` (N, K) with its background column replaced by the stage-1 ``logits`` (N, K) one.

    Returns ``calibrated`` itself when there is no background column (``background_index`` None).
    """
    if background_index is None:
        return calibrated
    keep = torch.zeros(calibrated.shape[1], dtype=torch.bool)
    keep[background_index] = True
    return torch.where(keep, logits.to(calibrated.dtype), calibrated)


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Validation metrics of calibrated logits (M, K) against labels (M,)."""
    predictions = logits.argmax(dim=1)
    return {
        "val_mean_class_accuracy": mean_class_accuracy(predictions, labels, logits.shape[1]),
        "val_accuracy": float((predictions == labels).double().mean()),
        "val_nll": negative_log_likelihood(logits, labels),
    }


def choose_on_val(
    name: str, grid: Sequence[float], logits_for: Callable[[float], torch.Tensor], labels: torch.Tensor
) -> tuple[float, list[dict[str, float]]]:
    """Pick the grid value whose logits score best on validation; returns ``(value, curve)``.

    ``logits_for(value) -> (M, K)`` validation logits; ``curve`` holds one ``{name, val_*}`` point per value.
    Best = highest mean-class accuracy, then lowest NLL; an exact tie keeps the earlier (smaller) value.
    """
    curve: list[dict[str, float]] = []
    best, best_key = grid[0], (-math.inf, -math.inf)
    for value in grid:
        point = {name: float(value), **score(logits_for(value), labels)}
        curve.append(point)
        key = (point["val_mean_class_accuracy"], -point["val_nll"])
        if key > best_key:
            best, best_key = float(value), key
    return best, curve


def settle(name: str, setting: float | str, grid: Sequence[float], default: float, report: dict[str, Any],
           val: tuple[Callable[[float], torch.Tensor], torch.Tensor] | None) -> float:
    """The value of a hyper-parameter that is a number or "auto", recorded in ``report``.

    ``val = (logits_for, labels)``: validation logits (M, K) of a value, and the labels (M,). "auto" with
    ``val`` chooses on the grid (:func:`choose_on_val`; the curve goes to ``report[name + "_curve"]``),
    "auto" without it is ``default``. With ``val`` the validation metrics of the value go to
    ``report["validation"]``.
    """
    if setting == "auto" and val is not None:
        value, report[f"{name}_curve"] = choose_on_val(name, grid, *val)
    else:
        value = default if setting == "auto" else float(setting)
    report[name] = value
    if val is not None:
        report["validation"] = score(val[0](value), val[1])
    return value


def stage1_weight(train: Bank, method: str) -> torch.Tensor:
    """The stage-1 classifier weight (K, d) float32 of the train bank, which ``method`` needs."""
    if train.classifier_weight is None:
        raise InputError(
            f"train bank {train.info.path} has no classifier weights (dataset 'classifier/weight'), which {method} needs; "
            "re-extract the bank with a model whose final linear layer is reachable."
        )
    return train.classifier_weight.to(torch.float32)


def check_choice(field: str, value: float | str, *, low: float = 0.0, strict: bool = False) -> None:
    """A hyper-parameter that is the string "auto" or a finite number >= ``low`` (> ``low`` if ``strict``)."""
    bound = f"> {low:g}" if strict else f">= {low:g}"
    if isinstance(value, str):
        if value != "auto":
            raise InputError(f"{field} should be a number {bound} or 'auto', found {value!r}.")
        return
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value < low or (strict and value == low)):
        raise InputError(f"{field} should be a number {bound} or 'auto', found {value!r}.")


def check_grid(field: str, grid: Sequence[float], *, low: float = 0.0) -> tuple[float, ...]:
    """A non-empty grid of finite numbers >= ``low``, as a tuple of floats."""
    values = tuple(grid)
    if not values:
        raise InputError(f"{field} should hold at least one value, found an empty grid.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
            raise InputError(f"{field} should hold finite numbers >= {low:g}, found {value!r}.")
    return tuple(float(v) for v in values)


def linear_grid(stop: float, step: float = 0.1) -> tuple[float, ...]:
    """0, step, …, stop rounded to 10 decimals (so 0.3 is 0.3, not 0.30000000000000004)."""
    return tuple(round(i * step, 10) for i in range(int(round(stop / step)) + 1))
