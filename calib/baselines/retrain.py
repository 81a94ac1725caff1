"""Classifier re-training baselines on frozen stage-1 outputs (Kang et al., ICLR 2020):

- ``LWS`` (learnable weight scaling): ẑ_j = f_j · z_j, one scale per class (init 1) on the full stage-1
  logits, bias included (classifier-balancing multiplies the whole ``fc`` output by ``scales``).
- ``CRT`` (classifier re-training): a freshly initialised linear layer ẑ = x·Wᵀ + b (d → K, PyTorch's
  ``nn.Linear`` initialisation U(±1/√d), from ``seed``) trained on the frozen features.

Both train with cross-entropy and class-balanced sampling through :func:`calib.training.run_sgd`.
Recipe (classifier-balancing ``config/ImageNet_LT/cls_lws.yaml`` / ``cls_crt.yaml``): SGD lr 0.2,
momentum 0.9, weight decay 5e-4, batch 512, cosine decay to 0; LWS 5 epochs, cRT 10 epochs. One
difference: the reference ``ClassAwareSampler`` draws max_j n_j · K samples per epoch (4 per class in a
row), here an epoch is as many class-balanced draws as there are training images, so the default
recipes take fewer steps than the reference; raise ``epochs`` to match it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from calib.bank import Bank
from calib.baselines.common import Baseline, clean_labelled, score
from calib.estimator import require_shape
from calib.training import RowSource, SGDRecipe, run_sgd

_RECIPE_NAMES = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "seed")


def lws_logits(logits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """ẑ = z ⊙ f.  logits (N, K), scales (K,) → (N, K)."""
    return logits * scales


def linear_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ẑ = x·Wᵀ + b.  features (N, d) any float dtype, weight (K, d), bias (K,) → (N, K) float32."""
    return features.to(weight.dtype) @ weight.T + bias


def linear_init(num_classes: int, feature_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """``nn.Linear`` initialisation (weight and bias U(−1/√d, 1/√d)), seeded: weight (K, d), bias (K,)."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(feature_dim)
    weight = (torch.rand(num_classes, feature_dim, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(num_classes, generator=generator) * 2 - 1) * bound
    return {"weight": weight, "bias": bias}


class _Retrained(Baseline):
    """Shared recipe handling of LWS and cRT."""

    hyperparameter_names = _RECIPE_NAMES

    def __init__(self, *, epochs: int, batch_size: int = 512, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, seed: int = 0):
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.seed = seed

    @property
    def recipe(self) -> SGDRecipe:
        return SGDRecipe(self.epochs, self.batch_size, self.lr, self.momentum, self.weight_decay, self.seed,
                         sampling="class-balanced")

    def _train(self, params: dict[str, torch.Tensor], loss_fn, train: Bank, val: Bank | None) -> dict[str, Any]:
        recipe = self.recipe  # validates the hyper-parameters before any work
        history = run_sgd(params, loss_fn, RowSource(bank=train), train.labels, train.sample_index, train.view, recipe)
        report: dict[str, Any] = {"train_loss": history["loss"], "epoch_seconds": history["seconds"]}
        if val is not None:
            features, logits, labels = clean_labelled(val, "val")
            report["validation"] = score(self._logits(params, features, logits), labels)
        return report

    def _logits(self, params: dict[str, torch.Tensor], features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self._logits(self.params_, features, logits)


class LWS(_Retrained):
    """Learnable weight scaling: per-class scales on the frozen stage-1 logits (recipe: module docstring)."""

    method = "lws"
    needs_features = False

    def __init__(self, *, epochs: int = 5, batch_size: int = 512, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, seed: int = 0):
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed)

    def _fit(self, train: Bank, val: Bank | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        params = {"scales": torch.ones(train.num_classes)}

        def loss_fn(p, feats, logits, y):
            return F.cross_entropy(lws_logits(logits, p["scales"]), y)

        return params, self._train(params, loss_fn, train, val)

    def _logits(self, params, features, logits):
        return lws_logits(logits, params["scales"])

    def _check_loaded_params(self) -> None:
        require_shape(self.params_, "scales", (self.meta_.num_classes,), "lws calibration")


class CRT(_Retrained):
    """Classifier re-training: a new linear layer on the frozen features (recipe: module docstring)."""

    method = "crt"

    def __init__(self, *, epochs: int = 10, batch_size: int = 512, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, seed: int = 0):
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed)

    def _fit(self, train: Bank, val: Bank | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        params = linear_init(train.num_classes, train.feature_dim, self.seed)

        def loss_fn(p, feats, logits, y):
            return F.cross_entropy(linear_logits(feats, p["weight"], p["bias"]), y)

        return params, self._train(params, loss_fn, train, val)

    def _logits(self, params, features, logits):
        return linear_logits(features, params["weight"], params["bias"])

    def _check_loaded_params(self) -> None:
        k, d, where = self.meta_.num_classes, self.meta_.feature_dim, "crt calibration"
        require_shape(self.params_, "weight", (k, d), where)
        require_shape(self.params_, "bias", (k,), where)
