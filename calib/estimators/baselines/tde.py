"""Deconfound-TDE inference (Tang, Huang & Zhang, NeurIPS 2020, "Long-Tailed Classification by Keeping
the Good and Removing the Bad Momentum Causal Effect") as a post-hoc baseline on banks.

TDE removes, at test time, the counterfactual effect of the head-biased "momentum" direction d̂ — the
moving average of the training features — from each feature before the classifier. Official code
(KaihuaTang/Long-Tailed-Recognition.pytorch, ``classification/models/CausalNormClassifier.py``, the
``use_effect`` branch of ``forward``; the paper's TDE inference, §4): for each of the classifier's heads
h, with x̂ = x/‖x‖, ĉ = d/‖d‖ and ŵ_i = w_i / (‖w_i‖ + γ),

    y_i = τ/H · Σ_h ŵ_{h,i}ᵀ (x̂_h − α · cos(x_h, ĉ_h) · ĉ_h)

A bank's stage-1 classifier is the plain linear layer z = W x + b (``classifier/weight``,
``classifier/bias``), not the causal-norm classifier TDE trains, so the same counterfactual is applied
to that layer's input, with one head and without normalising x (‖x‖ is a positive factor per row that the
normalised form divides out):

    x − α · (xᵀd̂) · d̂        ⇒        ẑ = z − α · (xᵀd̂) · (W d̂)          d̂ = μ / ‖μ‖

μ is the mean clean-view training feature (the exact mean of what the official code tracks as a moving
average, ``embed_mean``). α = 0 is the stage-1 model; α = 1 removes the projection on d̂. ``alpha="auto"``
chooses α on the validation bank from ``alpha_grid`` (0, 0.1, …, 3; the official configs use 1–3),
best mean-class accuracy, ties → lower NLL; without a validation bank α = 1.

RoI banks (``background_index`` set), as the official LVIS head (``lvis1.0/mmdet/models/roi_heads/
bbox_heads/convfc_bbox_head.py``): μ is the mean over foreground rows only (``update_embed``), and
``KEEP_FG`` keeps the stage-1 background probability and redistributes the foreground probability
mass by the TDE logits. As logits with the background logit untouched, that is

    ẑ_j = y_j − logsumexp_fg(y) + logsumexp_fg(z)   (j foreground, y = z − α·(xᵀd̂)·(W d̂)),   ẑ_bg = z_bg.
"""

from __future__ import annotations

from typing import Any

import torch

from disalign.calib.data.bank import Bank
from disalign.calib.errors import InputError
from disalign.calib.estimators.base import require_shape
from disalign.calib.estimators.baselines.common import (
    Baseline,
    check_choice,
    check_grid,
    clean_labelled,
    linear_grid,
    settle,
    stage1_weight,
)

DEFAULT_ALPHA = 1.0
DEFAULT_ALPHA_GRID = linear_grid(3.0)  # 0, 0.1, …, 3


def tde_logits(features: torch.Tensor, logits: torch.Tensor, direction: torch.Tensor, class_effect: torch.Tensor,
               alpha: float | torch.Tensor, background_index: int | None = None) -> torch.Tensor:
    """ẑ = z − α·(xᵀd̂)·(W d̂), and the KEEP_FG rule with a background column (module docstring).

    features x (N, d) any float dtype, logits z (N, K), direction d̂ (d,) unit, class_effect W d̂ (K,) → (N, K) float32.
    """
    projection = features.to(torch.float32) @ direction  # (N,) xᵀd̂
    calibrated = logits - alpha * projection.unsqueeze(1) * class_effect
    if background_index is None:
        return calibrated
    foreground = torch.ones(logits.shape[1], dtype=torch.bool)
    foreground[background_index] = False
    shift = torch.logsumexp(logits[:, foreground], dim=1) - torch.logsumexp(calibrated[:, foreground], dim=1)  # (N,)
    return torch.where(foreground, calibrated + shift.unsqueeze(1), logits)


class TDE(Baseline):
    """Deconfound-TDE counterfactual inference on the stage-1 linear classifier; ``alpha`` a number >= 0 or "auto"."""

    method = "tde"

    def __init__(self, alpha: float | str = "auto", *, alpha_grid: tuple[float, ...] | list[float] = DEFAULT_ALPHA_GRID):
        self.alpha = alpha
        self.alpha_grid = alpha_grid  # stored as given (scikit-learn clone); checked in fit

    def _fit(self, train: Bank, val: Bank | None, *, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        check_choice("alpha", self.alpha)
        grid = check_grid("alpha_grid", self.alpha_grid)
        weight = stage1_weight(train, "tde")
        background = train.info.background_index
        features, _, labels = clean_labelled(train, "train")
        if background is not None:
            features = features[labels != background]
            if features.shape[0] == 0:
                raise InputError(f"train bank {train.info.path} has no foreground rows, so tde has no mean feature.")
        mean = features.mean(dim=0)
        if float(mean.norm()) == 0.0:
            raise InputError(f"train bank {train.info.path}: the mean training feature is zero, so tde has no direction.")
        direction = mean / mean.norm()
        class_effect = weight @ direction  # (K,) W d̂
        report: dict[str, Any] = {}
        on_val = None
        if val is not None:
            val_features, val_logits, val_labels = clean_labelled(val, "val")
            on_val = (lambda a: tde_logits(val_features, val_logits, direction, class_effect, a, background), val_labels)
        alpha = settle("alpha", self.alpha, grid, DEFAULT_ALPHA, report, on_val)
        return {"direction": direction, "class_effect": class_effect, "alpha": torch.tensor(alpha)}, report

    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        p = self.params_
        return tde_logits(features, logits, p["direction"], p["class_effect"], p["alpha"], self.meta_.background_index)

    def _check_loaded_params(self) -> None:
        k, d, where = self.meta_.num_classes, self.meta_.feature_dim, "tde calibration"
        for name, shape in (("alpha", ()), ("class_effect", (k,)), ("direction", (d,))):
            require_shape(self.params_, name, shape, where)
