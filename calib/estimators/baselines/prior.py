"""Logit-only baselines: the stage-1 model as is (``joint``) and post-hoc logit adjustment.

Logit adjustment (Menon et al., ICLR 2021, post-hoc form):

    ẑ_j = z_j − τ · log π_j        π_j = n_j / Σ_k n_k   (training class priors)

with n the training class counts of the train bank (``Bank.training_class_counts``). A class with no
training example is counted as 1 so that log π stays finite. With a background column (RoI banks) π is
over the foreground classes and the background logit is left as it is (its count is 0 by convention:
counted as 1 it would raise the background logit by τ·log N and every region would become background). ``tau="auto"`` chooses τ on the validation
bank from ``tau_grid`` (best mean-class accuracy, ties → lower NLL); without a validation bank it is
τ = 1, the Bayes-optimal value for the balanced error.

    est = LogitAdjustment(tau="auto").fit(train, val)
    calibrated = est.predict_logits(features, logits)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from disalign.calib.data.bank import Bank
from disalign.calib.estimators.base import require_shape
from disalign.calib.estimators.baselines.common import (
    Baseline,
    check_choice,
    check_grid,
    clean_labelled,
    linear_grid,
    score,
    settle,
)

DEFAULT_TAU = 1.0
DEFAULT_TAU_GRID = linear_grid(3.0)  # 0, 0.1, …, 3


def log_priors(class_counts: np.ndarray | torch.Tensor, background_index: int | None = None) -> torch.Tensor:
    """log π (K,) float32 from training counts (K,); zero counts are treated as 1.

    With ``background_index`` the priors are over the other (foreground) classes and the background
    entry is 0, so that z − τ·log π leaves the background logit as it is.
    """
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64).clamp(min=1.0)
    if background_index is not None:
        counts[background_index] = 0.0
    log_prior = (counts / counts.sum()).log()
    if background_index is not None:
        log_prior[background_index] = 0.0
    return log_prior.to(torch.float32)


def adjust_logits(logits: torch.Tensor, log_prior: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """ẑ = z − τ·log π.  logits (N, K), log_prior (K,) → (N, K)."""
    return logits - tau * log_prior


class Joint(Baseline):
    """The stage-1 classifier as is: calibrated logits are the stored logits (no hyper-parameters)."""

    method = "joint"
    needs_features = False

    def _fit(self, train: Bank, val: Bank | None, *, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        report: dict[str, Any] = {}
        if val is not None:
            _, logits, labels = clean_labelled(val, "val")
            report["validation"] = score(logits, labels)
        return {}, report

    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.clone()


class LogitAdjustment(Baseline):
    """Post-hoc logit adjustment ẑ = z − τ·log π; ``tau`` is a number >= 0 or "auto" (see module docstring)."""

    method = "logit-adjust"
    needs_features = False

    def __init__(self, tau: float | str = "auto", *, tau_grid: tuple[float, ...] | list[float] = DEFAULT_TAU_GRID):
        self.tau = tau
        self.tau_grid = tau_grid  # stored as given (scikit-learn clone); checked in fit

    def _fit(self, train: Bank, val: Bank | None, *, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        check_choice("tau", self.tau)
        grid = check_grid("tau_grid", self.tau_grid)
        log_prior = log_priors(train.training_class_counts(), train.info.background_index)
        report: dict[str, Any] = {}
        on_val = None
        if val is not None:
            _, val_logits, val_labels = clean_labelled(val, "val")
            on_val = (lambda t: adjust_logits(val_logits, log_prior, t), val_labels)
        tau = settle("tau", self.tau, grid, DEFAULT_TAU, report, on_val)
        return {"log_prior": log_prior, "tau": torch.tensor(tau)}, report

    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return adjust_logits(logits, self.params_["log_prior"], self.params_["tau"])

    def _check_loaded_params(self) -> None:
        where = "logit-adjust calibration"
        require_shape(self.params_, "log_prior", (self.meta_.num_classes,), where)
        require_shape(self.params_, "tau", (), where)
