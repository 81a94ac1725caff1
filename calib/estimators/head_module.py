"""A fitted calibration as a ``torch.nn.Module``: (features, logits) → (probabilities, calibrated logits).

    head = CalibrationHead(load_calibration("calib/"))
    probabilities, calibrated = head(features, logits)      # features (N, d), logits (N, K) float32

What ``disalign export`` traces into ONNX and TorchScript graphs (:mod:`disalign.feature_extract.export`).
The module computes exactly what :meth:`Calibrator.predict_proba` and :meth:`Calibrator.predict_logits`
compute — it calls the estimator's own ``_predict_logits`` on the fitted tensors, registered here as
buffers, and then the target prior of a calibration aligned by ``disalign adapt`` — so there is no second
copy of any method's math to drift from the first. The fitted tensors are constants of the graph; the
metadata that selects a branch (background column, head form, cosine gate) is fixed when it is built,
which is why a traced graph of this module is the calibration and nothing but it.

Every method of :data:`~disalign.calib.estimators.methods.METHODS` is a fixed sequence of tensor
operations on (features, logits) once fitted, and :data:`EXPORTABLE_METHODS` lists the ones whose trace
is checked against ``predict_proba`` by the tests (all eight today). A method outside that list is refused
in one sentence rather than traced unchecked: a trace records one path through Python control flow, and
a method whose prediction branches on the data would be silently wrong.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from disalign.calib.core import label_shift
from disalign.calib.errors import InputError
from disalign.calib.estimators.base import Calibrator

# The methods whose traced graph the tests compare with predict_proba (tests/feature_extract/test_export.py).
EXPORTABLE_METHODS = ("joint", "disalign", "logit-adjust", "tau-norm", "lws", "crt", "ncm", "tde")


def check_exportable(calibrator: Calibrator) -> None:
    """Raise :class:`InputError` (one sentence) if ``calibrator`` is not a fitted calibration of an exportable method."""
    calibrator._check_fitted()
    if calibrator.method not in EXPORTABLE_METHODS:
        raise InputError(f"method {calibrator.method!r} cannot be exported: its prediction is not checked as a graph "
                         f"(exportable: {', '.join(EXPORTABLE_METHODS)}).")


class CalibrationHead(nn.Module):
    """The calibration of a fitted estimator as a module (see the module docstring).

    forward(features (N, d) float, logits (N, K) float) → (probabilities (N, K), calibrated logits (N, K)),
    both float32: ``predict_proba`` and ``predict_logits`` of the estimator, target prior included.
    """

    def __init__(self, calibrator: Calibrator):
        super().__init__()
        check_exportable(calibrator)
        meta = calibrator.meta_
        self.method = calibrator.method
        self.num_classes, self.feature_dim = meta.num_classes, meta.feature_dim
        self._names = sorted(calibrator.params_)
        for name in self._names:
            self.register_buffer(name, calibrator.params_[name].detach().to(torch.float32).clone())
        # A copy that reads its fitted tensors from this module's buffers at each call (so .to(), a
        # state_dict and a trace all see them), with the metadata its prediction branches on.
        self._estimator = copy.copy(calibrator)
        self._calibration: label_shift.ProbabilityCalibration | None = None
        self.aligned = meta.target_prior is not None
        if self.aligned:  # z / T + b + log π − log(1/K), as Calibrator._calibrated_logits
            self._calibration = (label_shift.ProbabilityCalibration.from_json(meta.probability_calibration)
                                 if meta.probability_calibration else None)
            zero = torch.zeros(1, meta.num_classes, dtype=torch.float64)  # with no calibration, adjust_to_prior(0) = log π − log(1/K)
            prior = torch.tensor(meta.target_prior, dtype=torch.float64)
            self.register_buffer("prior_shift", label_shift.adjust_to_prior(zero, prior, None)[0])  # (K,) float64

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._estimator.params_ = {name: getattr(self, name) for name in self._names}
        calibrated = self._estimator._predict_logits(features, logits.to(torch.float32))
        if self.aligned:
            calibrated = (label_shift.calibrated_logits(calibrated, self._calibration) + self.prior_shift).float()
        return torch.softmax(calibrated, dim=1), calibrated

    def extra_repr(self) -> str:
        return f"method={self.method!r}, num_classes={self.num_classes}, feature_dim={self.feature_dim}"
