"""The estimator contract shared by DisAlign and every baseline, and the calibration artifact.

An estimator stores keyword hyper-parameters in ``__init__`` exactly as given; ``fit(features, logits,
labels, class_counts=None)`` on arrays or ``fit(train, val=None)`` on banks (with the same fit-time
options ``max_memory`` and ``progress`` for every method) validates, runs the math and stores fitted
tensors in ``params_`` and metadata in ``meta_``; arrays become an in-memory :class:`Bank`
(``Bank.from_arrays``), so both roads run the same fit. ``predict_logits`` maps stage-1
``(features (N, d), logits (N, K))`` — torch tensors or numpy arrays, the result in the same kind; features
None for the methods that calibrate logits alone — to calibrated logits (N, K); ``score`` is the
mean-class accuracy. scikit-learn conventions hold: ``get_params`` /
``set_params`` (so ``sklearn.base.clone`` works), a repr of the non-default hyper-parameters, fitted
attributes with a trailing underscore (``classes_``, ``class_names_``, ``n_features_in_``) and
``sklearn.utils.validation.check_is_fitted``; scikit-learn itself is not needed.

Artifact (spec: ``docs/calibration-format.md``): ``parameters.safetensors`` (the tensors of ``params_``)
and ``calibration.json`` (method, hyper-parameters, K, d, class names, model fingerprint, the banks'
preprocessing, fit report). :meth:`Calibrator.save` publishes them as a new version of a calibration
directory (:mod:`disalign.calib.artifact.publish`); :meth:`Calibrator.load` reads the current version and checks
everything in it (:mod:`disalign.calib.artifact.format`).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from disalign.calib.artifact.format import (
    CalibrationMeta,
    artifact_bytes,
    canary,
    check_hyperparameters,
    check_metadata,
    check_tensors,
    read_artifact,
)
from disalign.calib.artifact.publish import publish
from disalign.calib.core import label_shift
from disalign.calib.core.metrics import mean_class_accuracy
from disalign.calib.data.bank import Bank, BankInfo, load_bank
from disalign.calib.errors import ArtifactError, InputError, NotFittedError


def as_bank(data: Bank | str | os.PathLike, role: str) -> Bank:
    """Accept a loaded :class:`Bank` or a path to one."""
    if isinstance(data, Bank):
        return data
    if isinstance(data, str | os.PathLike):
        return load_bank(data)
    raise InputError(f"{role} should be a Bank or a path to a bank file, found {type(data).__name__}.")


def check_banks_agree(train: BankInfo, other: BankInfo, role: str) -> None:
    """The validation/test bank must come from the same model and label space as the training bank."""
    if other.num_classes != train.num_classes:
        raise InputError(f"{role} bank {other.path} has K={other.num_classes} classes but the training bank has K={train.num_classes}.")
    if other.feature_dim != train.feature_dim:
        raise InputError(f"{role} bank {other.path} has d={other.feature_dim} features but the training bank has d={train.feature_dim}.")
    if other.model_fingerprint and train.model_fingerprint and other.model_fingerprint != train.model_fingerprint:
        raise InputError(
            f"{role} bank {other.path} was made by model {other.model_fingerprint[:19]} but the training bank by {train.model_fingerprint[:19]}."
        )


ArrayLike = torch.Tensor | np.ndarray


def as_tensor(value: ArrayLike, name: str) -> torch.Tensor:
    """A torch tensor of a tensor or numpy array (shares memory unless the array is read-only or strided)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise InputError(f"{name} should be a numeric array, found dtype {value.dtype}.")
        if not value.flags.writeable:  # torch warns on read-only memory it cannot own
            value = value.copy()
        return torch.from_numpy(np.ascontiguousarray(value))
    raise InputError(f"{name} should be a numpy array or a torch tensor, found {type(value).__name__}.")


def _like_inputs(result: torch.Tensor, *inputs: ArrayLike) -> ArrayLike:
    """``result`` as a numpy array when any input is one, else as the tensor it is."""
    return result.numpy() if any(isinstance(x, np.ndarray) for x in inputs) else result


def _same(value: Any, default: Any) -> bool:
    """Whether a hyper-parameter equals its default (for the repr)."""
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except (TypeError, ValueError, RuntimeError):  # arrays and tensors have no single truth value
        return False


def check_inputs(features: torch.Tensor, logits: torch.Tensor, num_classes: int, feature_dim: int) -> None:
    """Validate predict-time tensors: features (N, d) and logits (N, K), finite."""
    if not isinstance(features, torch.Tensor) or not isinstance(logits, torch.Tensor):
        raise InputError("features and logits should be torch tensors.")
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise InputError(f"logits should have shape (N, {num_classes}), found {tuple(logits.shape)}.")
    if features.ndim != 2 or features.shape[1] != feature_dim:
        raise InputError(f"features should have shape (N, {feature_dim}), found {tuple(features.shape)}.")
    if features.shape[0] != logits.shape[0]:
        raise InputError(f"features have {features.shape[0]} rows but logits have {logits.shape[0]}.")
    if not features.is_floating_point() or not logits.is_floating_point():
        raise InputError(f"features and logits should be floating point, found {features.dtype} and {logits.dtype}.")
    if not torch.isfinite(logits).all() or not torch.isfinite(features).all():
        raise InputError("features and logits must be finite; found NaN or inf.")


class Calibrator:
    """Base class of all calibration methods (see module docstring for the contract)."""

    method: ClassVar[str] = ""
    needs_features: ClassVar[bool] = True  # False for methods that only look at the logits
    # True for a method whose fit can stream the training bank from disk (``fit(max_memory=…)``); the
    # others load it whole and ignore max_memory.
    streams_training_bank: ClassVar[bool] = False

    params_: dict[str, torch.Tensor]
    meta_: CalibrationMeta

    # -- subclass hooks -------------------------------------------------------------------------
    def _fit(self, train: Bank, val: Bank | None, *, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Return ``(params, report)``; ``progress``: show a bar of the fit's steps, if it has steps to show."""
        raise NotImplementedError

    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- hyper-parameters (scikit-learn conventions: sklearn.base.clone works on every estimator) ----
    @classmethod
    def _param_names(cls) -> list[str]:
        """The keyword hyper-parameters: the parameters of ``__init__``, which stores each one as given."""
        return [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyper-parameter name → value, as given to ``__init__`` (``deep``: no nested estimators, so no effect)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Calibrator:
        """Set hyper-parameters by name (validated by the next ``fit``); returns self."""
        valid = self._param_names()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise InputError(f"{', '.join(unknown)} {'is not a hyper-parameter' if len(unknown) == 1 else 'are not hyper-parameters'} "
                             f"of {type(self).__name__}; valid: {', '.join(valid) or 'none'}.")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        """``DisAlign(rho=1.5, epochs=5)``: the hyper-parameters that differ from their defaults."""
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{name}={value!r}" for name, value in self.get_params().items() if not _same(value, defaults.get(name))]
        return f"{type(self).__name__}({', '.join(changed)})"

    # -- fitted state: params_, meta_ and what derives from them ----------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "params_")

    def __sklearn_tags__(self):
        """scikit-learn's estimator tags (``check_is_fitted`` reads them). Only scikit-learn calls this, so
        it is installed then; the fit takes banks, not ``(X, y)``, hence no estimator type."""
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False), requires_fit=True)

    @property
    def classes_(self) -> np.ndarray:
        """The class indices 0..K-1 (int64) that :meth:`predict` returns; names in :attr:`class_names_`."""
        self._check_fitted()
        return np.arange(self.meta_.num_classes, dtype=np.int64)

    @property
    def class_names_(self) -> list[str]:
        self._check_fitted()
        return list(self.meta_.class_names)

    @property
    def n_features_in_(self) -> int:
        """d, the feature width the calibration expects."""
        self._check_fitted()
        return self.meta_.feature_dim

    # -- public API -----------------------------------------------------------------------------
    def fit(self, features: Any, logits: Any = None, labels: Any = None, class_counts: Any = None, *,
            val: Any = None, classifier: Any = None, max_memory: int | None = None, progress: bool = False) -> Calibrator:
        """Fit on arrays or on a bank; returns self.

        - Arrays: ``fit(features (N, d), logits (N, K), labels (N,), class_counts=None)`` — numpy arrays or
          torch tensors; ``class_counts`` (K,) are the training counts, by default the histogram of
          ``labels``; ``features=None`` for the methods that calibrate logits alone (joint, logit-adjust,
          lws, and tau-norm with ``classifier``); ``classifier=(weight (K, d), bias (K,) or None)`` is the
          stage-1 linear layer that tau-norm and tde need; ``val=(features, logits, labels)``.
        - A bank: ``fit(train, val=None)`` with a :class:`Bank` or a path (``fit(train, val)`` as well).

        ``val`` makes the choices the method makes on a validation bank (ρ, τ …) and fits the probability
        calibration. The fit-time options, the same for every method (so a caller never asks which one it
        holds): ``max_memory`` (bytes) bounds the training rows held in memory where the method can stream
        its bank (:attr:`streams_training_bank`; the others load it whole and ignore it); ``progress``
        shows a bar on stderr, when stderr is a terminal, for a method with steps to show (DisAlign, LWS,
        cRT). Off by default: a library call prints nothing.
        """
        train, val = self._fit_inputs(features, logits, labels, class_counts, val, classifier)
        return self._fit_bank(train, val, max_memory=max_memory, progress=progress)

    def _fit_inputs(self, features, logits, labels, class_counts, val, classifier) -> tuple[Any, Any]:
        """``fit``'s arguments as (training bank or path, validation bank, path or None)."""
        if isinstance(features, Bank | str | os.PathLike):
            if labels is not None or class_counts is not None or classifier is not None:
                raise InputError("fit(train, val) takes a bank (its labels, counts and classifier are in it); labels, "
                                 "class_counts and classifier are for fit(features, logits, labels).")
            if logits is not None and val is not None:
                raise InputError("fit(train, val) got two validation banks (the second argument and val=); give one.")
            return features, val if val is not None else logits
        if logits is None or labels is None:
            raise InputError(f"fit takes a bank or (features, logits, labels) arrays, found {type(features).__name__} "
                             f"and {'no logits' if logits is None else 'no labels'}.")
        train = Bank.from_arrays(features, logits, labels, class_counts, classifier=classifier)
        if isinstance(val, tuple | list):
            if len(val) != 3:
                raise InputError(f"val should be a bank or (features, logits, labels), found a sequence of {len(val)}.")
            val = Bank.from_arrays(*val, classifier=classifier, role="val")
        return train, val

    def _fit_bank(self, train: Bank | str | os.PathLike, val: Bank | str | os.PathLike | None, *,
                  max_memory: int | None, progress: bool) -> Calibrator:
        """The fit on a training bank (or its path) and an optional validation bank (what :meth:`fit` normalises to)."""
        train_bank = as_bank(train, "train")
        val_bank = as_bank(val, "val") if val is not None else None
        if val_bank is not None:
            check_banks_agree(train_bank.info, val_bank.info, "val")
        if not (train_bank.labels >= 0).any():
            raise InputError(f"train bank {train_bank.info.path} has no labelled rows (all labels are -1).")
        if train_bank.feature_dim == 0 and not self._fits_without_features(train_bank):
            raise InputError(f"{self.method} needs the features (N, d) of the training rows; only joint, logit-adjust, lws and "
                             "tau-norm (with classifier=(weight, bias)) calibrate logits alone.")
        params, report = self._fit(train_bank, val_bank, progress=progress)
        self._set_fitted(train_bank.info, train_bank.training_class_counts(), params, report)
        return self.fit_probability_calibration(val_bank) if val_bank is not None else self

    def _fits_without_features(self, train: Bank) -> bool:
        """Whether this method can be fitted on logits alone (a bank of d = 0); tau-norm needs the classifier."""
        return not self.needs_features

    def _predicts_without_features(self) -> bool:
        """Whether the fitted calibration maps logits alone (``features=None``)."""
        return not self.needs_features

    def score(self, features: ArrayLike | None, logits: ArrayLike, labels: ArrayLike) -> float:
        """Mean-class accuracy (the mean of the per-class accuracies over the classes present in ``labels``)
        of the calibrated predictions; rows labelled -1 are left out."""
        predictions = torch.as_tensor(np.asarray(self.predict(features, logits)))
        labels = torch.as_tensor(np.asarray(labels)).to(torch.int64)
        if labels.shape != predictions.shape:
            raise InputError(f"labels should be a 1d array of {predictions.shape[0]} labels, got an array of shape "
                             f"{tuple(labels.shape)} instead.")
        keep = labels >= 0
        if not bool(keep.any()):
            raise InputError("score needs labelled rows; every label is -1.")
        return mean_class_accuracy(predictions[keep], labels[keep], self.meta_.num_classes)

    def _set_fitted(self, info: BankInfo, class_counts, params: dict[str, torch.Tensor], report: dict[str, Any]) -> Calibrator:
        """Store fitted tensors and the metadata that makes the artifact self-describing."""
        self.params_ = {name: t.detach().to(torch.float32).contiguous() for name, t in params.items()}
        self.meta_ = CalibrationMeta(
            method=self.method,
            num_classes=info.num_classes,
            feature_dim=info.feature_dim,
            class_names=list(info.class_names),
            model_fingerprint=info.model_fingerprint,
            hyperparameters=_jsonable(self.get_params()),
            background_index=info.background_index,
            class_counts=[int(c) for c in class_counts],
            report=_jsonable(report),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            preprocessing=_jsonable(dict(info.preprocessing)) or None,
        )
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "params_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit() or load() first.")

    # Inputs are torch tensors or numpy arrays (e.g. read with h5py); the result is a numpy array when
    # either input is one, else a tensor.
    def predict_logits(self, features: ArrayLike | None, logits: ArrayLike, *, validate: bool = True) -> ArrayLike:
        """Calibrated logits (N, K) float32 from stage-1 features (N, d) and logits (N, K).

        ``features=None`` for a calibration that maps logits alone (joint, logit-adjust, lws, tau-norm with
        the classifier's bias). ``validate=False`` skips the shape and finiteness checks, for a caller that
        made them already.
        """
        return _like_inputs(self._calibrated_logits(features, logits, validate), features, logits)

    def predict_proba(self, features: ArrayLike | None, logits: ArrayLike) -> ArrayLike:
        """Calibrated class probabilities (N, K) float32."""
        return _like_inputs(torch.softmax(self._calibrated_logits(features, logits), dim=1), features, logits)

    def predict(self, features: ArrayLike | None, logits: ArrayLike) -> ArrayLike:
        """Predicted class indices (N,) int64 (indices into :attr:`classes_` / :attr:`class_names_`)."""
        return _like_inputs(self._calibrated_logits(features, logits).argmax(dim=1), features, logits)

    @torch.inference_mode()
    def _calibrated_logits(self, features: ArrayLike | None, logits: ArrayLike, validate: bool = True) -> torch.Tensor:
        self._check_fitted()
        logits = as_tensor(logits, "logits")
        features = as_tensor(features, "features") if features is not None else None
        feature_dim = self.meta_.feature_dim
        absent = features is None or (features.ndim == 2 and features.shape[1] == 0)
        if absent or feature_dim == 0:
            # logits alone: the features are absent, or this calibration was fitted without any (d = 0)
            if absent and feature_dim > 0 and not self._predicts_without_features():
                raise InputError(f"this {type(self).__name__} calibration needs the features (N, {feature_dim}) beside the logits; "
                                 "only joint, logit-adjust, lws and tau-norm calibrate logits alone.")
            features, feature_dim = logits.new_zeros((logits.shape[0] if logits.ndim else 0, 0)), 0
        if validate:
            check_inputs(features, logits, self.meta_.num_classes, feature_dim)
        calibrated = self._predict_logits(features, logits.to(torch.float32))
        if self.meta_.target_prior is not None:  # a calibration derived by `disalign adapt --out`
            calibrated = label_shift.prior_logits(calibrated, self.meta_.target_prior, self.meta_.probability_calibration)
        return calibrated

    def fit_probability_calibration(self, val: Bank | str | os.PathLike) -> Calibrator:
        """Fit bias-corrected temperature scaling of this calibration's probabilities on a labelled bank
        (clean view), for label-shift estimation (:mod:`disalign.calib.core.label_shift`); stored in the metadata."""
        self._check_fitted()
        if self.meta_.target_prior is not None:
            raise InputError("this calibration is aligned to a target prior; fit the probability calibration on the balanced one.")
        bank = as_bank(val, "val")
        rows = label_shift.calibration_rows(bank.view, bank.labels)
        if rows.numel() < label_shift.MIN_CALIBRATION_ROWS:
            return self  # too few labelled rows to fit anything: the artifact says None
        logits = self.predict_logits(bank.features[rows], bank.logits[rows])
        fitted = label_shift.fit_probability_calibration(logits, bank.labels[rows])
        self.meta_.probability_calibration = fitted.to_json()
        return self

    def check_compatible(self, *, num_classes: int, feature_dim: int, model_fingerprint: str = "", source: str = "model") -> None:
        """Raise :class:`ArtifactError` if this calibration does not fit a bank or model."""
        self._check_fitted()
        meta = self.meta_
        if num_classes != meta.num_classes:
            raise ArtifactError(f"the calibration has K={meta.num_classes} classes but the {source} has K={num_classes}.")
        if feature_dim != meta.feature_dim:
            raise ArtifactError(f"the calibration has d={meta.feature_dim} features but the {source} has d={feature_dim}.")
        if model_fingerprint and meta.model_fingerprint and model_fingerprint != meta.model_fingerprint:
            raise ArtifactError(
                f"the calibration was fitted for model {meta.model_fingerprint[:19]} but the {source} is {model_fingerprint[:19]}."
            )

    def save(self, directory: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Publish the artifact as the new version of the calibration directory (atomic; see :mod:`disalign.calib.artifact.publish`).

        The directory must be new, empty or hold a calibration; nothing else in it is ever deleted.
        Returns the calibration directory (what :meth:`load` and the server take).
        """
        self._check_fitted()
        metadata = asdict(self.meta_)
        if self.meta_.feature_dim == 0:
            raise ArtifactError("this calibration was fitted without features (features=None), so it records no feature width "
                                "d that a server could check against its model; fit it with the features to save it.")
        if not self.meta_.model_fingerprint:
            raise ArtifactError("the calibration records no model fingerprint (its training bank has none, as arrays have none), "
                                "so no server could check it against a model; extract the banks with disalign extract, or pass "
                                "model_fingerprint to write_bank or to Bank.from_arrays and fit on that bank.")
        # Never publish what load() would refuse (a diverged fit, say): a server's watcher would pick it up.
        check_metadata(metadata, "the calibration metadata")
        check_tensors(self.params_, "the calibration")
        canary(self, "the calibration")
        publish(directory, artifact_bytes(self.params_, metadata, self.method), overwrite=overwrite)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Calibrator:
        """Load the current version of a calibration directory; everything in it is checked (:mod:`disalign.calib.artifact.format`)."""
        params, meta = read_artifact(directory)
        if cls.method and meta.method != cls.method:
            raise ArtifactError(f"{directory} holds a '{meta.method}' calibration, not '{cls.method}'.")
        return cls.from_artifact(params, meta, str(directory))

    @classmethod
    def from_artifact(cls, params: dict[str, torch.Tensor], meta: CalibrationMeta, where: str) -> Calibrator:
        """The fitted estimator of read, checked artifact contents: hyper-parameters, shapes, then the canary."""
        check_hyperparameters(cls, meta.hyperparameters, where)
        # JSON has no tuples: the sequence hyper-parameters (grids) come back as the tuples they were given as
        hyperparameters = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.hyperparameters.items()}
        try:
            est = cls(**hyperparameters)
        except Exception as exc:  # the constructor's own checks: still one sentence
            raise ArtifactError(f"{where}: the hyperparameters are refused by {cls.__name__} ({exc}).") from None
        est.params_, est.meta_ = params, meta
        est._check_loaded_params()
        canary(est, where)
        return est

    def _check_loaded_params(self) -> None:
        """Subclasses check the shapes of ``params_`` against ``meta_``."""


def require_shape(params: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: str) -> None:
    if name not in params:
        raise ArtifactError(f"{where}: parameter '{name}' is missing.")
    if tuple(params[name].shape) != shape:
        raise ArtifactError(f"{where}: parameter '{name}' should have shape {shape}, found {tuple(params[name].shape)}.")


def _jsonable(value: Any) -> Any:
    """Plain JSON types for metadata (tuples → lists, tensors/arrays → lists, numbers → float/int)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
