"""The estimator contract shared by DisAlign and every baseline, and the calibration artifact.

An estimator stores keyword hyper-parameters in ``__init__``; ``fit(train, val=None)`` validates, runs
the math and stores fitted tensors in ``params_`` and metadata in ``meta_``; ``predict_logits`` maps
stage-1 ``(features (N, d), logits (N, K))`` to calibrated logits (N, K).

Artifact (spec: ``docs/calibration-format.md``): ``parameters.safetensors`` (the tensors of ``params_``)
and ``calibration.json`` (method, hyper-parameters, K, d, class names, model fingerprint, the banks'
preprocessing, fit report). :meth:`Calibrator.save` publishes them as a new version of a calibration
directory (:mod:`calib.publish`); :meth:`Calibrator.load` reads the current version and checks
everything in it (:mod:`calib.artifact`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import torch

from calib.artifact import (
    ARTIFACT_VERSION,
    artifact_bytes,
    canary,
    check_hyperparameters,
    check_tensors,
    read_files,
    validate_metadata,
)
from calib.bank import Bank, BankInfo, load_bank
from calib.errors import ArtifactError, InputError, NotFittedError
from calib.publish import METADATA_FILE, PARAMETERS_FILE, publish


@dataclass
class CalibrationMeta:
    """What a fitted estimator knows about the bank and model it was fitted on."""

    method: str
    num_classes: int
    feature_dim: int
    class_names: list[str]
    model_fingerprint: str
    hyperparameters: dict[str, Any]
    background_index: int | None = None
    class_counts: list[int] | None = None
    report: dict[str, Any] = field(default_factory=dict)  # ρ curve, validation metrics, timings …
    artifact_version: int = ARTIFACT_VERSION
    created: str = ""
    preprocessing: dict[str, Any] | None = None  # the training bank's, so the server can use the same


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

    params_: dict[str, torch.Tensor]
    meta_: CalibrationMeta

    # -- subclass hooks -------------------------------------------------------------------------
    def _fit(self, train: Bank, val: Bank | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Return ``(params, report)``."""
        raise NotImplementedError

    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} if hasattr(self, "__dataclass_fields__") else dict(vars(self))

    def fit(self, train: Bank | str | os.PathLike, val: Bank | str | os.PathLike | None = None) -> Calibrator:
        train_bank = as_bank(train, "train")
        val_bank = as_bank(val, "val") if val is not None else None
        if val_bank is not None:
            check_banks_agree(train_bank.info, val_bank.info, "val")
        if not (train_bank.labels >= 0).any():
            raise InputError(f"train bank {train_bank.info.path} has no labelled rows (all labels are -1).")
        params, report = self._fit(train_bank, val_bank)
        return self._set_fitted(train_bank.info, train_bank.training_class_counts(), params, report)

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

    @torch.inference_mode()
    def predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated logits (N, K) float32 from stage-1 features (N, d) and logits (N, K)."""
        self._check_fitted()
        check_inputs(features, logits, self.meta_.num_classes, self.meta_.feature_dim)
        return self._predict_logits(features, logits.to(torch.float32))

    def predict_proba(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities (N, K)."""
        return torch.softmax(self.predict_logits(features, logits), dim=1)

    def predict(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Predicted class indices (N,) int64."""
        return self.predict_logits(features, logits).argmax(dim=1)

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
        """Publish the artifact as the new version of the calibration directory (atomic; see :mod:`calib.publish`).

        The directory must be new, empty or hold a calibration; nothing else in it is ever deleted.
        Returns the calibration directory (what :meth:`load` and the server take).
        """
        self._check_fitted()
        metadata = asdict(self.meta_)
        if not self.meta_.model_fingerprint:
            raise ArtifactError("the calibration records no model fingerprint (its training bank has none), so no server "
                                "could check it against a model; extract the banks with disalign extract, or pass "
                                "model_fingerprint to write_bank.")
        validate_metadata(metadata, META_FIELDS, "the calibration metadata")  # never publish what load() refuses
        publish(directory, artifact_bytes(self.params_, metadata, self.method), overwrite=overwrite)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Calibrator:
        """Load the current version of a calibration directory; everything in it is checked (:mod:`calib.artifact`)."""
        params, meta = read_artifact(directory)
        if cls.method and meta.method != cls.method:
            raise ArtifactError(f"{directory} holds a '{meta.method}' calibration, not '{cls.method}'.")
        return cls.from_artifact(params, meta, str(directory))

    @classmethod
    def from_artifact(cls, params: dict[str, torch.Tensor], meta: CalibrationMeta, where: str) -> Calibrator:
        """The fitted estimator of read, checked artifact contents: hyper-parameters, shapes, then the canary."""
        check_hyperparameters(cls, meta.hyperparameters, where)
        try:
            est = cls(**meta.hyperparameters)
        except Exception as exc:  # the constructor's own checks: still one sentence
            raise ArtifactError(f"{where}: the hyperparameters are refused by {cls.__name__} ({exc}).") from None
        est.params_, est.meta_ = params, meta
        est._check_loaded_params()
        canary(est, where)
        return est

    def _check_loaded_params(self) -> None:
        """Subclasses check the shapes of ``params_`` against ``meta_``."""


META_FIELDS = {f.name for f in fields(CalibrationMeta)}


def read_artifact(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CalibrationMeta]:
    """Read and check the files of the current version of a calibration directory (both from one version)."""
    source, raw, params = read_files(directory)
    meta = CalibrationMeta(**validate_metadata(raw, META_FIELDS, str(source / METADATA_FILE)))
    return check_tensors(params, str(source / PARAMETERS_FILE)), meta


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
