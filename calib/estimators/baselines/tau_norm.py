"""τ-normalised classifier (Kang et al., ICLR 2020, "Decoupling representation and classifier").

    W̃_j = W_j / ‖W_j‖^τ          ẑ = x · W̃ᵀ          (no bias, as classifier-balancing's ``pnorm``)

W (K, d) is the stage-1 classifier stored in the train bank (``classifier/weight``). τ = 0 is the
stage-1 classifier without its bias, τ = 1 scores each class by ‖x‖·cos(x, W_j). ``tau="auto"``
chooses τ on the validation bank from ``tau_grid`` (0, 0.1, …, 2 as the reference sweep; best mean-class
accuracy, ties → lower NLL); without a validation bank τ = 1. Features are stored as float16: all products
are computed in float32. The fit report records ``logit_reconstruction_error``, max |x·Wᵀ + b − z| / max |z|
over the first clean rows of the train bank: a large value means the stored weights do not produce the
stored logits (e.g. a cosine classifier), and τ-norm results are then not comparable. With a background
column (RoI banks) only the foreground classifier is normalised: the background logit stays the stage-1 one.

From the logits alone: when z = x·Wᵀ + b (the bank's stored layer gives its stored logits), x·W̃_jᵀ =
(z_j − b_j) / ‖W_j‖^τ, so the fit also stores ``logit_bias`` b (K,) and ``logit_scale`` ‖W_j‖^−τ (K,) and a
calibration can be applied to logits with ``features=None`` (and fitted on ``features=None`` with
``classifier=(W, b)``). An artifact written before these two were stored needs the features.
"""

from __future__ import annotations

from typing import Any

import torch

from disalign.calib.data.bank import Bank
from disalign.calib.estimators.base import require_shape
from disalign.calib.estimators.baselines.common import (
    Baseline,
    check_choice,
    check_grid,
    clean_labelled,
    keep_background,
    linear_grid,
    settle,
    stage1_weight,
)

DEFAULT_TAU = 1.0
DEFAULT_TAU_GRID = linear_grid(2.0)  # 0, 0.1, …, 2
RECONSTRUCTION_ROWS = 1024


def tau_normalise(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """W_j / ‖W_j‖^τ for every row of weight (K, d) → (K, d) float32; all-zero rows stay zero."""
    weight = weight.to(torch.float32)
    norms = weight.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return weight / norms.pow(tau)


def tau_norm_logits(features: torch.Tensor, normalised_weight: torch.Tensor) -> torch.Tensor:
    """x · W̃ᵀ: features (N, d) any float dtype, normalised_weight (K, d) → (N, K) float32."""
    return features.to(torch.float32) @ normalised_weight.T


def tau_norm_from_logits(logits: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(z − b) ⊙ ‖W‖^−τ: logits (N, K), bias (K,), scale (K,) → (N, K); equals x · W̃ᵀ when z = x·Wᵀ + b."""
    return (logits.to(torch.float32) - bias) * scale


def reconstruction_error(features: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """max |x·Wᵀ + b − z| / max |z| over rows of features (N, d) and logits (N, K)."""
    recon = features.to(torch.float32) @ weight.to(torch.float32).T
    if bias is not None:
        recon = recon + bias.to(torch.float32)
    scale = float(logits.abs().max()) if logits.numel() else 0.0
    return float((recon - logits).abs().max()) / scale if scale > 0 else 0.0


class TauNorm(Baseline):
    """τ-normalised stage-1 classifier; ``tau`` is a number >= 0 or "auto" (see module docstring)."""

    method = "tau-norm"

    def __init__(self, tau: float | str = "auto", *, tau_grid: tuple[float, ...] | list[float] = DEFAULT_TAU_GRID):
        self.tau = tau
        self.tau_grid = tau_grid  # stored as given (scikit-learn clone); checked in fit

    def _fit(self, train: Bank, val: Bank | None, *, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        check_choice("tau", self.tau)
        grid = check_grid("tau_grid", self.tau_grid)
        weight = stage1_weight(train, "tau-norm")
        bias = train.classifier_bias if train.classifier_bias is not None else torch.zeros(weight.shape[0])
        norms = weight.norm(dim=1).clamp(min=torch.finfo(torch.float32).tiny)  # (K,) ‖W_j‖
        features, logits, _ = clean_labelled(train, "train")
        report: dict[str, Any] = {}
        if features.shape[1]:  # fitted on logits alone (features=None), there is nothing to reconstruct
            report["logit_reconstruction_error"] = reconstruction_error(
                features[:RECONSTRUCTION_ROWS], logits[:RECONSTRUCTION_ROWS], weight, train.classifier_bias)
        background = train.info.background_index
        on_val = None
        if val is not None:
            val_features, val_logits, val_labels = clean_labelled(val, "val")

            def val_logits_for(t: float) -> torch.Tensor:
                z = (tau_norm_logits(val_features, tau_normalise(weight, t)) if val_features.shape[1]
                     else tau_norm_from_logits(val_logits, bias, norms.pow(-t)))
                return keep_background(z, val_logits, background)

            on_val = (val_logits_for, val_labels)
        tau = settle("tau", self.tau, grid, DEFAULT_TAU, report, on_val)
        return {"weight": tau_normalise(weight, tau), "tau": torch.tensor(tau), "logit_bias": bias.to(torch.float32),
                "logit_scale": norms.pow(-tau)}, report

    def _fits_without_features(self, train: Bank) -> bool:
        return train.classifier_weight is not None

    def _predicts_without_features(self) -> bool:
        return "logit_scale" in self.params_

    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if features.shape[1] == 0:  # logits alone (features=None)
            z = tau_norm_from_logits(logits, self.params_["logit_bias"], self.params_["logit_scale"])
        else:
            z = tau_norm_logits(features, self.params_["weight"])
        return keep_background(z, logits, self.meta_.background_index)

    def _check_loaded_params(self) -> None:
        where = "tau-norm calibration"
        require_shape(self.params_, "weight", (self.meta_.num_classes, self.meta_.feature_dim), where)
        require_shape(self.params_, "tau", (), where)
        if "logit_scale" in self.params_ or "logit_bias" in self.params_:  # written since the logits-only form
            require_shape(self.params_, "logit_bias", (self.meta_.num_classes,), where)
            require_shape(self.params_, "logit_scale", (self.meta_.num_classes,), where)
