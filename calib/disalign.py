"""The DisAlign estimator: fits α, β and the confidence gate on a feature bank with the GRW loss.

    est = DisAlign(rho="auto").fit("train.h5", val="val.h5")
    calibrated = est.predict_logits(features, logits)
    est.save("calib_dir"); est = DisAlign.load("calib_dir")

``rho="auto"`` grid-searches ρ on the validation bank (best mean-class accuracy, ties broken by lower
NLL) and keeps that fit; the whole curve is stored in the artifact. Without a validation bank, ``"auto"``
falls back to :data:`DEFAULT_RHO`. Runs are deterministic, so keeping the grid's best fit is the same as
refitting with the chosen ρ.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from calib.bank import Bank, BankReader
from calib.baselines.common import check_grid
from calib.errors import InputError
from calib.estimator import Calibrator, as_bank, check_banks_agree, require_shape
from calib.grw import grw_cross_entropy, grw_weights
from calib.head import confidence_gate, disalign_logits, initial_parameters
from calib.metrics import mean_class_accuracy, negative_log_likelihood
from calib.training import RowSource, SGDRecipe, run_sgd

DEFAULT_RHO = 1.0
DEFAULT_RHO_GRID = tuple(i * 0.25 for i in range(13))  # 0, 0.25, …, 3


class DisAlign(Calibrator):
    """Distribution alignment (Zhang et al., CVPR 2021) on cached stage-1 outputs.

    Hyper-parameters: ``rho`` (float or "auto"), ``rho_grid``, the SGD recipe (``epochs``, ``batch_size``,
    ``lr``, ``momentum``, ``weight_decay``, ``seed``), ``cosine`` (gate on L2-normalised features, for
    cosine classifiers), ablation switches ``use_magnitude`` (α), ``use_margin`` (β), ``use_grw``
    (False = plain CE), and ``count_smoothing`` (added to every class count before GRW).
    """

    method = "disalign"

    def __init__(
        self,
        rho: float | str = "auto",
        *,
        rho_grid: tuple[float, ...] | list[float] = DEFAULT_RHO_GRID,
        epochs: int = 10,
        batch_size: int = 256,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        seed: int = 0,
        cosine: bool = False,
        use_magnitude: bool = True,
        use_margin: bool = True,
        use_grw: bool = True,
        count_smoothing: float = 0.0,
    ):
        self.rho = rho
        self.rho_grid = rho_grid  # as given (scikit-learn's clone relies on it); checked by fit
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.seed = seed
        self.cosine = cosine
        self.use_magnitude = use_magnitude
        self.use_margin = use_margin
        self.use_grw = use_grw
        self.count_smoothing = count_smoothing

    @property
    def recipe(self) -> SGDRecipe:
        return SGDRecipe(self.epochs, self.batch_size, self.lr, self.momentum, self.weight_decay, self.seed)

    # -- fitting --------------------------------------------------------------------------------
    def fit(self, train: Bank | str | os.PathLike, val: Bank | str | os.PathLike | None = None, *,
            max_memory: int | None = None) -> DisAlign:
        """Fit on a bank (or its path). With ``max_memory`` (bytes) smaller than the bank's row data,
        the training bank is streamed from disk in windows of chunks instead of loaded."""
        if max_memory is None or isinstance(train, Bank):
            return super().fit(train, val)
        if max_memory <= 0:
            raise InputError(f"max_memory should be a positive number of bytes, found {max_memory}.")
        with BankReader(train) as reader:
            info = reader.info
            row_bytes = info.feature_dim * np.dtype(info.feature_dtype).itemsize + info.num_classes * 4
            if info.num_rows * row_bytes <= max_memory:
                return super().fit(reader.load(), val)
            val_bank = as_bank(val, "val") if val is not None else None
            if val_bank is not None:
                check_banks_agree(info, val_bank.info, "val")
            labels = torch.from_numpy(reader.column("labels"))
            if not (labels >= 0).any():
                raise InputError(f"train bank {info.path} has no labelled rows (all labels are -1).")
            sample_index, view = torch.from_numpy(reader.column("sample_index")), torch.from_numpy(reader.column("view"))
            counts = info.class_counts
            if counts is None:
                clean = (view == 0) & (labels >= 0)
                counts = np.bincount(labels[clean].numpy(), minlength=info.num_classes).astype(np.int64)
            # The shuffled window is the one large buffer; keep room for one chunk read plus its indexed copy.
            window_rows = max(info.chunk_rows, int(max_memory // row_bytes) - 3 * info.chunk_rows)
            source = RowSource(reader=reader, window_rows=window_rows)
            params, report = self.fit_source(source, labels, sample_index, view, counts, info.background_index, val_bank)
            report["streamed"] = {"window_rows": window_rows, "max_memory": max_memory}
            self._set_fitted(info, counts, params, report)
            return self.fit_probability_calibration(val_bank) if val_bank is not None else self

    def _fit(self, train: Bank, val: Bank | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.fit_source(RowSource(bank=train), train.labels, train.sample_index, train.view,
                               train.training_class_counts(), train.info.background_index, val)

    def fit_source(
        self,
        source: RowSource,
        labels: torch.Tensor,
        sample_index: torch.Tensor,
        view: torch.Tensor,
        class_counts: np.ndarray,
        background_index: int | None,
        val: Bank | None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Fit on any :class:`RowSource` (in memory or streamed); used by :meth:`fit` and the streaming path."""
        if isinstance(self.rho, str):
            if self.rho != "auto":
                raise InputError(f"rho should be a number >= 0 or 'auto', found {self.rho!r}.")
            grid = check_grid("rho_grid", self.rho_grid) if val is not None else (DEFAULT_RHO,)
        else:
            grid = (float(self.rho),)
        if not self.use_grw:
            grid = (0.0,)
        num_classes, feature_dim = len(class_counts), source.feature_dim
        for rho in grid:  # validate every ρ before spending time on fits
            grw_weights(class_counts, rho, background_index=background_index, count_smoothing=self.count_smoothing)
        curve, best, best_key = [], None, None
        start = time.perf_counter()
        for rho in grid:
            weights = grw_weights(class_counts, rho, background_index=background_index, count_smoothing=self.count_smoothing)
            params = initial_parameters(num_classes, feature_dim)
            frozen = tuple(name for name, on in (("alpha", self.use_magnitude), ("beta", self.use_margin)) if not on)
            if not self.use_magnitude:
                params["alpha"].zero_()  # no magnitude term: ẑ = z + σβ

            def loss_fn(p, feats, logits, y, weights=weights):
                z = disalign_logits(feats, logits, p["alpha"], p["beta"], p["gate_weight"], p["gate_bias"],
                                    cosine=self.cosine, background_index=background_index)
                return grw_cross_entropy(z, y, weights)

            history = run_sgd(params, loss_fn, source, labels, sample_index, view, self.recipe, frozen)
            point: dict[str, Any] = {"rho": rho, "train_loss": history["loss"][-1]}
            if val is not None:
                point.update(self._score(params, val, background_index))
            curve.append(point)
            key = (point.get("val_mean_class_accuracy", 0.0), -point.get("val_nll", 0.0))
            if best_key is None or key > best_key:
                best, best_key = (rho, params, history), key
        assert best is not None
        rho, params, history = best
        report = {"rho": rho, "rho_curve": curve, "epoch_seconds": history["seconds"], "train_loss": history["loss"],
                  "fit_seconds": time.perf_counter() - start}
        if val is not None:
            report["validation"] = next(p for p in curve if p["rho"] == rho)
        return params, report

    def _score(self, params: dict[str, torch.Tensor], val: Bank, background_index: int | None) -> dict[str, float]:
        labelled = val.labels >= 0
        with torch.no_grad():
            z = disalign_logits(val.features[labelled], val.logits[labelled], params["alpha"], params["beta"],
                                params["gate_weight"], params["gate_bias"], cosine=self.cosine, background_index=background_index)
        y = val.labels[labelled]
        return {"val_mean_class_accuracy": mean_class_accuracy(z.argmax(1), y, z.shape[1]),
                "val_accuracy": float((z.argmax(1) == y).double().mean()),
                "val_nll": negative_log_likelihood(z, y)}

    # -- prediction -----------------------------------------------------------------------------
    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        p = self.params_
        return disalign_logits(features, logits, p["alpha"], p["beta"], p["gate_weight"], p["gate_bias"],
                               cosine=self.cosine, background_index=self.meta_.background_index)

    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        """The gate σ(x) (N,) for features (N, d)."""
        self._check_fitted()
        return confidence_gate(features, self.params_["gate_weight"], self.params_["gate_bias"], cosine=self.cosine)

    def _check_loaded_params(self) -> None:
        k, d, where = self.meta_.num_classes, self.meta_.feature_dim, "disalign calibration"
        for name, shape in (("alpha", (k,)), ("beta", (k,)), ("gate_weight", (d,)), ("gate_bias", ())):
            require_shape(self.params_, name, shape, where)
