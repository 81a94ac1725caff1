"""Nearest class mean (NCM) on cl2n features, as classifier-balancing's ``KNNClassifier`` (cl2n, l2).

    x̂   = (x − μ) / ‖x − μ‖              μ: mean of the clean-view labelled training features
    c_j = mean of x̂ over training rows of class j   (not re-normalised, as the reference)
    ẑ_j = −‖x̂ − c_j‖² / T

The prediction is the nearest class mean (squared Euclidean distance, as the reference's
``l2_similarity``); logits are minus the squared distance, so softmax(ẑ) gives probabilities. T only
changes probabilities, never the argmax: ``temperature="auto"`` fits T on the validation bank by
minimising NLL (1-D L-BFGS on log T), and is 1 without a validation bank; a number fixes T. A class with
no training row has no mean: its logit is :data:`ABSENT_LOGIT`, so it is never predicted.

With a background column (RoI banks) the background has no class mean: its logit is the stage-1 one, and
the foreground logits get an offset s, ẑ_j = −‖x̂ − c_j‖² / T + s, because against a fixed background
logit the level of the foreground logits matters; ``temperature="auto"`` then fits T and s together on
the validation bank (NLL over the K classes, background included); without validation s = 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from disalign.calib.data.bank import Bank
from disalign.calib.estimators.base import require_shape
from disalign.calib.estimators.baselines.common import (
    Baseline,
    check_choice,
    clean_labelled,
    keep_background,
    score,
)

ABSENT_LOGIT = -1.0e4
DEFAULT_TEMPERATURE = 1.0


def cl2n(features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Centre by mean (d,) and L2-normalise: features (N, d) any float dtype → (N, d) float32."""
    return F.normalize(features.to(torch.float32) - mean, dim=1)


def class_means(normalised: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means (K, d) of normalised features (N, d) with labels (N,) in 0..K-1, and a presence mask (K,)."""
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float32)
    sums = torch.zeros(num_classes, normalised.shape[1]).index_add_(0, labels, normalised)
    return sums / counts.clamp(min=1).unsqueeze(1), (counts > 0).to(torch.float32)


def ncm_logits(normalised: torch.Tensor, centroids: torch.Tensor, present: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """−‖x̂ − c_j‖² / T.  normalised (N, d), centroids (K, d), present (K,) 0/1 → (N, K); absent classes get ABSENT_LOGIT."""
    distance = (normalised.pow(2).sum(1, keepdim=True) + centroids.pow(2).sum(1) - 2 * normalised @ centroids.T).clamp(min=0)
    logits = -distance / temperature
    return torch.where(present.bool(), logits, torch.full_like(logits, ABSENT_LOGIT))


def fit_temperature(neg_distance: torch.Tensor, labels: torch.Tensor, present: torch.Tensor,
                    background: tuple[int, torch.Tensor] | None = None) -> tuple[float, float]:
    """(T > 0, offset s) minimising the NLL of softmax(−d² / T + s) over the present classes.

    neg_distance (M, K) = −‖x̂ − c_j‖², labels (M,), present (K,) 0/1. Rows of absent classes are ignored
    (their NLL does not depend on T). Without ``background`` s = 0 (softmax ignores it) and this is a 1-D
    L-BFGS on log T from T = 1; with ``background = (index, stage-1 background logits (M,))`` that column
    is the stage-1 logit and s is fitted too. log T is clamped to [-20, 20].
    """
    columns = present.bool().clone()
    if background is not None:
        columns[background[0]] = True
    rows = columns[labels]
    if not bool(rows.any()):
        return DEFAULT_TEMPERATURE, 0.0
    z = neg_distance[rows].double()
    y = (torch.cumsum(columns.long(), 0) - 1)[labels[rows]]  # labels renumbered over the kept columns
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    offset = torch.zeros((), dtype=torch.float64, requires_grad=background is not None)
    optimizer = torch.optim.LBFGS([log_t, offset] if background is not None else [log_t], lr=1.0, max_iter=100,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        scaled = z / log_t.clamp(-20, 20).exp() + offset
        if background is not None:
            scaled = keep_background(scaled, background[1][rows].double().unsqueeze(1).expand_as(scaled), background[0])
        loss = F.cross_entropy(scaled[:, columns], y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().clamp(-20, 20).exp()), float(offset.detach())


class NCM(Baseline):
    """Nearest class mean on cl2n features; ``temperature`` is a number > 0 or "auto" (see module docstring)."""

    method = "ncm"

    def __init__(self, temperature: float | str = "auto"):
        self.temperature = temperature

    def _fit(self, train: Bank, val: Bank | None, *, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        check_choice("temperature", self.temperature, low=0.0, strict=True)
        background = train.info.background_index
        features, _, labels = clean_labelled(train, "train")
        mean = features.mean(dim=0)
        centroids, present = class_means(cl2n(features, mean), labels, train.num_classes)
        if background is not None:  # the background is not a class with a mean
            centroids[background], present[background] = 0.0, 0.0
        report: dict[str, Any] = {"classes_without_mean": int((present == 0).sum()) - (background is not None)}
        temperature = DEFAULT_TEMPERATURE if self.temperature == "auto" else float(self.temperature)
        offset = 0.0
        if val is not None:
            val_features, val_logits, val_labels = clean_labelled(val, "val")
            val_normalised = cl2n(val_features, mean)
            if self.temperature == "auto":
                fg_background = None if background is None else (background, val_logits[:, background])
                temperature, offset = fit_temperature(ncm_logits(val_normalised, centroids, present, 1.0), val_labels, present, fg_background)
                # the values stored and used
                temperature, offset = (float(torch.tensor(v, dtype=torch.float32)) for v in (temperature, offset))
            val_z = keep_background(ncm_logits(val_normalised, centroids, present, temperature) + offset, val_logits, background)
            report["validation"] = score(val_z, val_labels)
        report["temperature"], report["offset"] = temperature, offset
        params = {"mean": mean, "centroids": centroids, "present": present, "temperature": torch.tensor(temperature),
                  "offset": torch.tensor(offset)}
        return params, report

    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        p = self.params_
        z = ncm_logits(cl2n(features, p["mean"]), p["centroids"], p["present"], p["temperature"]) + p["offset"]
        return keep_background(z, logits, self.meta_.background_index)

    def _check_loaded_params(self) -> None:
        k, d, where = self.meta_.num_classes, self.meta_.feature_dim, "ncm calibration"
        self.params_.setdefault("offset", torch.tensor(0.0))  # artifacts written before the offset existed
        for name, shape in (("mean", (d,)), ("centroids", (k, d)), ("present", (k,)), ("temperature", ()), ("offset", ())):
            require_shape(self.params_, name, shape, where)
