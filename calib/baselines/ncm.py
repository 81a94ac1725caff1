"""Nearest class mean (NCM) on cl2n features, as classifier-balancing's ``KNNClassifier`` (cl2n, l2).

    x̂   = (x − μ) / ‖x − μ‖              μ: mean of the clean-view labelled training features
    c_j = mean of x̂ over training rows of class j   (not re-normalised, as the reference)
    ẑ_j = −‖x̂ − c_j‖² / T

The prediction is the nearest class mean (squared Euclidean distance, as the reference's
``l2_similarity``); logits are minus the squared distance, so softmax(ẑ) gives probabilities. T only
changes probabilities, never the argmax: ``temperature="auto"`` fits T on the validation bank by
minimising NLL (1-D L-BFGS on log T), and is 1 without a validation bank; a number fixes T. A class with
no training row has no mean: its logit is :data:`ABSENT_LOGIT`, so it is never predicted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from calib.bank import Bank
from calib.baselines.common import Baseline, check_choice, clean_labelled, score
from calib.estimator import require_shape

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


def fit_temperature(neg_distance: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> float:
    """T > 0 minimising the NLL of softmax(−d² / T) over the present classes.

    neg_distance (M, K) = −‖x̂ − c_j‖², labels (M,), present (K,) 0/1. Rows of absent classes are ignored
    (their NLL does not depend on T). 1-D L-BFGS on log T, from T = 1, clamped to [e^-20, e^20].
    """
    columns = present.bool()
    rows = columns[labels]
    if not bool(rows.any()):
        return DEFAULT_TEMPERATURE
    z = neg_distance[rows][:, columns].double()
    y = (torch.cumsum(columns.long(), 0) - 1)[labels[rows]]  # labels renumbered over the present classes
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.clamp(-20, 20).exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().clamp(-20, 20).exp())


class NCM(Baseline):
    """Nearest class mean on cl2n features; ``temperature`` is a number > 0 or "auto" (see module docstring)."""

    method = "ncm"
    hyperparameter_names = ("temperature",)

    def __init__(self, temperature: float | str = "auto"):
        self.temperature = temperature

    def _fit(self, train: Bank, val: Bank | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        check_choice("temperature", self.temperature, low=0.0, strict=True)
        features, _, labels = clean_labelled(train, "train")
        mean = features.mean(dim=0)
        centroids, present = class_means(cl2n(features, mean), labels, train.num_classes)
        report: dict[str, Any] = {"classes_without_mean": int((present == 0).sum())}
        temperature = DEFAULT_TEMPERATURE if self.temperature == "auto" else float(self.temperature)
        if val is not None:
            val_features, _, val_labels = clean_labelled(val, "val")
            val_normalised = cl2n(val_features, mean)
            if self.temperature == "auto":
                temperature = fit_temperature(ncm_logits(val_normalised, centroids, present, 1.0), val_labels, present)
                temperature = float(torch.tensor(temperature, dtype=torch.float32))  # the value stored and used
            report["validation"] = score(ncm_logits(val_normalised, centroids, present, temperature), val_labels)
        report["temperature"] = temperature
        params = {"mean": mean, "centroids": centroids, "present": present, "temperature": torch.tensor(temperature)}
        return params, report

    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        p = self.params_
        return ncm_logits(cl2n(features, p["mean"]), p["centroids"], p["present"], p["temperature"])

    def _check_loaded_params(self) -> None:
        k, d, where = self.meta_.num_classes, self.meta_.feature_dim, "ncm calibration"
        for name, shape in (("mean", (d,)), ("centroids", (k, d)), ("present", (k,)), ("temperature", ())):
            require_shape(self.params_, name, shape, where)
