"""Reading and checking the two files of a calibration artifact (spec: ``docs/calibration-format.md``).

Everything a reader (``disalign eval``, the server at start-up, ``/admin/reload``, its watcher) gets
from an artifact passes through here, so all of them refuse the same things with the same sentence:

- ``calibration.json`` against :class:`ArtifactMetadata`, a strict pydantic model: no coercion (``"3"``
  is not an int, ``"no"`` is not a bool), class names strings, a non-empty model fingerprint,
  ``background_index`` in 0..K-1 or null, the report fields that eval and the plots read typed;
- the tensors of ``parameters.safetensors``: float32 or float16 only, finite (then held as float32);
- the hyper-parameters against the estimator's own ``__init__`` annotations (strict as well);
- a **canary**: the loaded estimator calibrates a few fixed rows and must give finite logits and
  probabilities that sum to 1 (an ``alpha`` of 3e38 passes every check above and still gives NaN).

Directory layout and publishing are :mod:`calib.publish`; the estimator glue is :mod:`calib.estimator`.
"""

from __future__ import annotations

import inspect
import json
import os
import typing
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from calib.errors import ArtifactError
from calib.publish import METADATA_FILE, PARAMETERS_FILE, artifact_dir

ARTIFACT_VERSION = 1
TENSOR_DTYPES = (torch.float32, torch.float16)
READ_ATTEMPTS = 3  # a version removed between resolving `current` and opening its files: resolve again


class RhoPoint(BaseModel):
    """One point of DisAlign's ρ search (the ρ plot reads these)."""

    model_config = ConfigDict(strict=True, extra="allow")
    rho: float
    train_loss: float | None = None
    val_mean_class_accuracy: float | None = None
    val_accuracy: float | None = None
    val_nll: float | None = None


class FitReport(BaseModel):
    """The fit report: the fields ``disalign fit``/``eval`` and the plots read are typed, others are free."""

    model_config = ConfigDict(strict=True, extra="allow")
    rho: float | None = None
    tau: float | None = None
    rho_curve: list[RhoPoint] | None = None
    validation: dict[str, float | None] | None = None
    fit_seconds: float | None = None
    epoch_seconds: list[float] | None = None


class ArtifactMetadata(BaseModel):
    """``calibration.json``. Extra keys are allowed by the model and checked against the estimator's
    metadata fields in :func:`validate_metadata` (an unknown key is refused)."""

    model_config = ConfigDict(strict=True, extra="allow")
    method: str = Field(min_length=1)
    artifact_version: int
    num_classes: int = Field(ge=1)
    feature_dim: int = Field(ge=1)
    class_names: list[str]
    model_fingerprint: str = Field(min_length=1)
    hyperparameters: dict[str, Any]
    background_index: int | None = None
    class_counts: list[int] | None = None
    report: FitReport = Field(default_factory=FitReport)
    created: str
    preprocessing: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ArtifactMetadata:
        k = self.num_classes
        if self.artifact_version != ARTIFACT_VERSION:
            raise ValueError(f"'artifact_version' should be {ARTIFACT_VERSION}, found {self.artifact_version}")
        if len(self.class_names) != k:
            raise ValueError(f"'class_names' should have K={k} names, found {len(self.class_names)}")
        if self.class_counts is not None and (len(self.class_counts) != k or min(self.class_counts, default=0) < 0):
            raise ValueError(f"'class_counts' should be K={k} counts >= 0, found {self.class_counts[:12]}")
        if self.background_index is not None and not 0 <= self.background_index < k:
            raise ValueError(f"'background_index' should be in 0..{k - 1} or null, found {self.background_index}")
        return self


def validate_metadata(raw: Any, known_fields: set[str], where: str) -> dict[str, Any]:
    """Check parsed ``calibration.json``; returns it unchanged (strict: nothing is coerced)."""
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where} should hold a JSON object, found {type(raw).__name__}.")
    try:
        ArtifactMetadata.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{where}: {error_sentence(exc)}") from None
    unknown = sorted(set(raw) - known_fields)
    if unknown:
        raise ArtifactError(f"{where}: unknown key {unknown[0]!r} (artifact version {ARTIFACT_VERSION} has {', '.join(sorted(known_fields))}).")
    return raw


def error_sentence(exc: ValidationError) -> str:
    """The first pydantic error as ``'field' should be …, found …``."""
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"'{loc}' is missing."
    if not loc:  # a check across fields: the message names its field
        return f"{msg}."
    msg = msg[msg.index("should "):] if "should " in msg else msg  # "Input should be …" → "should be …"
    found = repr(first.get("input"))
    return f"'{loc}' {msg}, found {found[:60] + '…' if len(found) > 60 else found}."


def check_tensors(params: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """float32/float16 and finite → float32 tensors; anything else is refused."""
    out = {}
    for name, tensor in params.items():
        if tensor.dtype not in TENSOR_DTYPES:
            raise ArtifactError(f"{where}: parameter '{name}' has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                "float32 or float16 expected.")
        if not torch.isfinite(tensor).all():
            raise ArtifactError(f"{where}: parameter '{name}' has NaN or inf values.")
        out[name] = tensor.to(torch.float32).contiguous()
    return out


def check_hyperparameters(cls: type, hyperparameters: dict[str, Any], where: str) -> None:
    """Each hyper-parameter must be a keyword of ``cls.__init__`` and match its annotation (strictly)."""
    signature = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    for name, value in hyperparameters.items():
        if name == "self" or name not in signature.parameters:
            raise ArtifactError(f"{where}: hyperparameter {name!r} is not a parameter of {cls.__name__}.")
        if name in hints:
            try:
                TypeAdapter(hints[name]).validate_python(value, strict=True)
            except ValidationError:
                raise ArtifactError(f"{where}: hyperparameter '{name}' should be {_type_name(hints[name])}, found {value!r}.") from None


def canary(calibrator, where: str) -> None:
    """Calibrate fixed rows (zeros, unit and large random features and logits): finite logits, probabilities summing to 1."""
    k, d = calibrator.meta_.num_classes, calibrator.meta_.feature_dim
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.0, 1.0, 10.0, 30.0]).repeat_interleave(2)[:, None]  # (8, 1)
    features = torch.randn(8, d, generator=generator) * scales
    logits = torch.randn(8, k, generator=generator) * scales
    try:
        calibrated = calibrator.predict_logits(features, logits)  # (8, K)
    except Exception as exc:  # a parameter the method cannot use: still one sentence
        raise ArtifactError(f"{where}: the calibration fails on test rows ({type(exc).__name__}: {exc}).") from None
    probabilities = torch.softmax(calibrated, dim=1)
    if not (torch.isfinite(calibrated).all() and torch.isfinite(probabilities).all()
            and torch.allclose(probabilities.sum(dim=1), torch.ones(8), atol=1e-4)):
        raise ArtifactError(f"{where}: the calibration gives NaN, inf or unnormalised probabilities on test rows "
                            "(its parameters are out of range).")


def artifact_bytes(params: dict[str, torch.Tensor], metadata: dict[str, Any], method: str) -> dict[str, bytes]:
    """The two files of an artifact as bytes (written by :func:`calib.publish.publish`)."""
    return {PARAMETERS_FILE: save_tensors(params, metadata={"method": method}),
            METADATA_FILE: (json.dumps(metadata, indent=2) + "\n").encode()}


def read_files(directory: str | os.PathLike) -> tuple[Path, Any, dict[str, torch.Tensor]]:
    """``(version directory, parsed calibration.json, raw tensors)``, both files from one resolved version."""
    for attempt in range(READ_ATTEMPTS):
        source = artifact_dir(directory)
        try:
            meta_text = (source / METADATA_FILE).read_bytes()
            params_data = (source / PARAMETERS_FILE).read_bytes()
            break
        except FileNotFoundError as exc:
            if attempt == READ_ATTEMPTS - 1:
                raise ArtifactError(f"{directory} is not a calibration directory: {exc.filename} is missing.") from None
        except IsADirectoryError as exc:
            raise ArtifactError(f"{exc.filename} should be a file, found a directory.") from None
    try:
        raw = json.loads(meta_text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{source / METADATA_FILE} is not valid JSON ({exc}).") from None
    try:
        params = load_tensors(params_data)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ArtifactError(f"{source / PARAMETERS_FILE} is not a readable safetensors file ({exc}).") from None
    return source, raw, params


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
