"""Any calibration method as a scikit-learn classifier of ``X = [features | logits]``, for ``Pipeline`` and
``GridSearchCV``.

scikit-learn's tools pass one ``X`` (rows they can index and split) and ``y``; a calibration takes two
arrays per row. :class:`SklearnAdapter` takes them side by side, the logits in the last ``num_classes``
columns (``stack_inputs(features, logits)``; logits alone for the methods that need no features)::

    from sklearn.model_selection import GridSearchCV
    X = disalign.stack_inputs(features, logits)                  # (N, d + K)
    search = GridSearchCV(disalign.SklearnAdapter(disalign.DisAlign(epochs=5), num_classes=10),
                          {"calibrator__rho": [0.5, 1.0, 1.5, 2.0]}, cv=3).fit(X, labels)
    search.best_params_, search.best_estimator_.calibrator_      # the fitted DisAlign

``fit(X, y, **fit_params)`` fits a clone of ``calibrator`` (the hyper-parameters stay as given, as
scikit-learn requires) with ``fit(features, logits, y, **fit_params)`` — ``class_counts`` and ``classifier``
pass through; the training class counts are then the fold's label histogram, in the proportions of the
whole training set. ``score`` is the calibrator's: mean-class accuracy, which a long-tailed test set
needs (plain accuracy is dominated by the head classes). scikit-learn is needed here only
(``pip install 'disalign[sklearn]'``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from disalign.calib.errors import InputError

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, clone
except ImportError as exc:  # pragma: no cover - the test extra has scikit-learn
    raise ImportError("disalign's scikit-learn adapter needs scikit-learn; install it with pip install 'disalign[sklearn]'.") from exc

__all__ = ["SklearnAdapter", "split_inputs", "stack_inputs"]


def stack_inputs(features: Any, logits: Any) -> np.ndarray:
    """``[features | logits]`` (N, d + K) float32 — the ``X`` of :class:`SklearnAdapter`; ``features=None``: the logits."""
    logits = np.asarray(logits, dtype=np.float32)
    if features is None:
        return logits
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or logits.ndim != 2 or features.shape[0] != logits.shape[0]:
        raise InputError(f"features (N, d) and logits (N, K) should be 2d arrays of the same N, found {features.shape} and {logits.shape}.")
    return np.concatenate([features, logits], axis=1)


def split_inputs(X: Any, num_classes: int) -> tuple[np.ndarray | None, np.ndarray]:
    """``X`` (N, d + K) → features (N, d) or None when d = 0, logits (N, K)."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] < num_classes:
        raise InputError(f"X should be a 2d array [features | logits] with at least num_classes={num_classes} columns, "
                         f"got an array of shape {X.shape} instead.")
    d = X.shape[1] - num_classes
    return (X[:, :d] if d else None), X[:, d:]


class SklearnAdapter(ClassifierMixin, BaseEstimator):
    """A calibration method (``calibrator``, unfitted) as a classifier of ``X = [features | logits]``.

    Parameters: ``calibrator`` (any estimator of ``METHODS``; its hyper-parameters are
    ``calibrator__<name>`` to ``set_params`` / ``GridSearchCV``) and ``num_classes`` (K, the width of the
    logits: the last K columns of X). Fitted: ``calibrator_``, ``classes_`` (0..K-1), ``n_features_in_``.
    """

    def __init__(self, calibrator: Any = None, num_classes: int | None = None):
        self.calibrator = calibrator
        self.num_classes = num_classes

    def _split(self, X: Any) -> tuple[np.ndarray | None, np.ndarray]:
        if not isinstance(self.num_classes, int | np.integer) or isinstance(self.num_classes, bool) or self.num_classes < 1:
            raise InputError(f"num_classes should be K >= 1, the width of the logits in the last columns of X, found {self.num_classes!r}.")
        return split_inputs(X, int(self.num_classes))

    def fit(self, X: Any, y: Any, **fit_params: Any) -> SklearnAdapter:
        if self.calibrator is None or not callable(getattr(self.calibrator, "fit", None)):
            raise InputError(f"calibrator should be an unfitted calibration method such as DisAlign(), found {self.calibrator!r}.")
        features, logits = self._split(X)
        self.calibrator_ = clone(self.calibrator).fit(features, logits, np.asarray(y), **fit_params)
        self.classes_ = np.arange(int(self.num_classes), dtype=np.int64)
        self.n_features_in_ = int(np.asarray(X).shape[1])
        return self

    def _fitted(self):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "calibrator_")
        return self.calibrator_

    def decision_function(self, X: Any) -> np.ndarray:
        """Calibrated logits (N, K)."""
        calibrator = self._fitted()
        return np.asarray(calibrator.predict_logits(*self._split(X)))

    def predict_proba(self, X: Any) -> np.ndarray:
        calibrator = self._fitted()
        return np.asarray(calibrator.predict_proba(*self._split(X)))

    def predict(self, X: Any) -> np.ndarray:
        calibrator = self._fitted()
        return np.asarray(calibrator.predict(*self._split(X)))

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean-class accuracy of the calibrated predictions (``sample_weight`` is not supported)."""
        if sample_weight is not None:
            raise InputError("SklearnAdapter.score is the mean-class accuracy, which takes no sample_weight.")
        calibrator = self._fitted()
        return calibrator.score(*self._split(X), np.asarray(y))
