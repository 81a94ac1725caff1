"""Classifier re-training baselines on frozen stage-1 outputs (Kang et al., ICLR 2020):

- ``LWS`` (learnable weight scaling): ẑ_j = f_j · z_j, one scale per class (init 1) on the full stage-1
  logits, bias included (classifier-balancing multiplies the whole ``fc`` output by ``scales``).
- ``CRT`` (classifier re-training): a freshly initialised linear layer ẑ = x·Wᵀ + b (d → K, PyTorch's
  ``nn.Linear`` initialisation U(±1/√d), from ``seed``) trained on the frozen features.

Recipe of classifier-balancing (``config/ImageNet_LT/cls_lws.yaml`` / ``cls_crt.yaml``, ``run_networks.py``):
cross-entropy, SGD lr 0.2, momentum 0.9, weight decay 5e-4 (on the scales too), batch 512, LWS 5 epochs,
cRT 10; batches from the class-aware sampler (4 per class in turn, :mod:`disalign.calib.core.sampling`); cosine
learning rate stepped once per epoch (constant within an epoch) from lr to 0.

Epoch size (``epoch_size``): ``"sampler"`` draws the sampler's length max_j n_j · C per epoch
(``ClassAwareSampler.__len__``; ImageNet-LT: 1,280,000 draws, 2,500 steps); ``"dataset"`` takes the
int(N / batch) full batches per epoch that ``run_networks.py`` actually trains before it breaks out of
the loader ("calculate training steps for each epoch based on actual number of training data instead of
oversampled data number"; ImageNet-LT: 226 steps). ``max_steps`` caps the total number of SGD steps
by shortening every epoch to max(1, max_steps // epochs) steps, so the schedule still runs its course;
the fit report records the steps and draws actually made.

Banks with a background column (RoI banks): the background logit stays the stage-1 one (LWS's
background scale is 1 and not trained; cRT's background column is the stage-1 logit, its new row unused
and stored as zeros), and the cross-entropy over K classes sees it as such.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from disalign.calib.core.sampling import ClassAwareSampler, ImageRows, epoch_cosine_lr
from disalign.calib.core.training import torch_threads, training_threads
from disalign.calib.data.bank import Bank
from disalign.calib.errors import InputError
from disalign.calib.estimators.base import require_shape
from disalign.calib.estimators.baselines.common import Baseline, clean_labelled, keep_background, score
from disalign.calib.progress import progress_bar

EPOCH_SIZES = ("sampler", "dataset")


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
    """Shared recipe handling and training loop of LWS and cRT."""


    def __init__(self, *, epochs: int, batch_size: int = 512, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, samples_per_class: int = 4, epoch_size: str = "sampler",
                 max_steps: int | None = None, seed: int = 0):
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.samples_per_class = samples_per_class
        self.epoch_size = epoch_size
        self.max_steps = max_steps
        self.seed = seed

    def _check_recipe(self) -> None:
        for name in ("epochs", "batch_size", "samples_per_class"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} should be an integer >= 1, found {value!r}.")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise InputError(f"max_steps should be an integer >= 1 or None, found {self.max_steps!r}.")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr should be > 0, found {self.lr}.")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise InputError(f"{name} should be a number >= 0, found {value!r}.")
        if self.epoch_size not in EPOCH_SIZES:
            raise InputError(f"epoch_size should be one of {', '.join(EPOCH_SIZES)}, found {self.epoch_size!r}.")

    def epoch_plan(self, num_items: int, sampler_length: int) -> tuple[int, int]:
        """(draws, SGD steps) per epoch for ``num_items`` training images and the sampler's length."""
        batch = self.batch_size
        draws = sampler_length if self.epoch_size == "sampler" else max(1, num_items // batch) * batch
        steps = math.ceil(draws / batch)
        if self.max_steps is not None and steps * self.epochs > self.max_steps:
            steps = max(1, self.max_steps // self.epochs)
            draws = min(draws, steps * batch)
        return draws, steps

    def _train(self, params: dict[str, torch.Tensor], loss_fn, train: Bank, val: Bank | None, progress: bool) -> dict[str, Any]:
        """SGD on class-aware batches of the train bank's rows, ``params`` updated in place; the fit report.
        ``progress``: a bar of the steps on a terminal's stderr."""
        self._check_recipe()
        generator = torch.Generator().manual_seed(self.seed)
        images = ImageRows(train.labels, train.sample_index, train.view)
        sampler = ClassAwareSampler(images.labels, samples_per_class=self.samples_per_class, generator=generator)
        draws, steps = self.epoch_plan(len(images), sampler.num_samples)
        trainable = [t.requires_grad_(True) for t in params.values()]
        optimizer = torch.optim.SGD(trainable, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        history: dict[str, list[float]] = {"loss": [], "seconds": [], "lr": []}
        bar = progress_bar(total=self.epochs * steps, enabled=progress, desc=f"{self.method} fit", unit="step")
        with bar, torch_threads(training_threads(self.batch_size, train.num_classes, train.feature_dim)):
            for epoch in range(self.epochs):
                start, total = time.perf_counter(), 0.0
                lr = epoch_cosine_lr(self.lr, epoch, self.epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                rows = images.rows(sampler.draw(draws), generator)
                for batch in rows.split(self.batch_size):
                    features = train.features[batch].float() if self.needs_features else None  # LWS reads logits only
                    loss = loss_fn(params, features, train.logits[batch], train.labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * batch.numel()
                    bar.update()
                history["loss"].append(total / draws)
                history["seconds"].append(time.perf_counter() - start)
                history["lr"].append(lr)
        for t in params.values():
            t.requires_grad_(False)
        report: dict[str, Any] = {"train_loss": history["loss"], "epoch_seconds": history["seconds"], "epoch_lr": history["lr"],
                                  "steps_per_epoch": steps, "draws_per_epoch": draws, "sampler_length": sampler.num_samples}
        if val is not None:
            features, logits, labels = clean_labelled(val, "val")
            report["validation"] = score(self._logits(params, features, logits, train.info.background_index), labels)
        return report

    def _logits(self, params: dict[str, torch.Tensor], features: torch.Tensor, logits: torch.Tensor,
                background_index: int | None) -> torch.Tensor:
        """The calibrated logits of ``params``; LWS and cRT each implement it."""
        raise NotImplementedError

    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self._logits(self.params_, features, logits, self.meta_.background_index)


class LWS(_Retrained):
    """Learnable weight scaling: per-class scales on the frozen stage-1 logits (recipe: module docstring)."""

    method = "lws"
    needs_features = False

    def __init__(self, *, epochs: int = 5, batch_size: int = 512, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, samples_per_class: int = 4, epoch_size: str = "sampler",
                 max_steps: int | None = None, seed: int = 0):
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         samples_per_class=samples_per_class, epoch_size=epoch_size, max_steps=max_steps, seed=seed)

    def _fit(self, train: Bank, val: Bank | None, *, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        params = {"scales": torch.ones(train.num_classes)}
        background = train.info.background_index

        def loss_fn(p, feats, logits, y):
            return F.cross_entropy(self._logits(p, feats, logits, background), y)

        report = self._train(params, loss_fn, train, val, progress)
        if background is not None:
            params["scales"][background] = 1.0  # never used; stored as the scale it stands for
        return params, report

    def _logits(self, params, features, logits, background_index):
        return keep_background(lws_logits(logits, params["scales"]), logits, background_index)

    def _check_loaded_params(self) -> None:
        require_shape(self.params_, "scales", (self.meta_.num_classes,), "lws calibration")


class CRT(_Retrained):
    """Classifier re-training: a new linear layer on the frozen features (recipe: module docstring)."""

    method = "crt"

    def __init__(self, *, epochs: int = 10, batch_size: int = 512, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, samples_per_class: int = 4, epoch_size: str = "sampler",
                 max_steps: int | None = None, seed: int = 0):
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         samples_per_class=samples_per_class, epoch_size=epoch_size, max_steps=max_steps, seed=seed)

    def _fit(self, train: Bank, val: Bank | None, *, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        params = linear_init(train.num_classes, train.feature_dim, self.seed)
        background = train.info.background_index

        def loss_fn(p, feats, logits, y):
            return F.cross_entropy(self._logits(p, feats, logits, background), y)

        report = self._train(params, loss_fn, train, val, progress)
        if background is not None:  # the row is never used: the background logit is the stage-1 one
            params["weight"][background] = 0.0
            params["bias"][background] = 0.0
        return params, report

    def _logits(self, params, features, logits, background_index):
        return keep_background(linear_logits(features, params["weight"], params["bias"]), logits, background_index)

    def _check_loaded_params(self) -> None:
        k, d, where = self.meta_.num_classes, self.meta_.feature_dim, "crt calibration"
        require_shape(self.params_, "weight", (k, d), where)
        require_shape(self.params_, "bias", (k,), where)
