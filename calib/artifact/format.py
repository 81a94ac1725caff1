"""The calibration artifact's format: the one typed model of ``calibration.json``, and the checks of its
two files (spec: ``docs/calibration-format.md``).

:class:`CalibrationMeta` *is* ``calibration.json``: a fitted estimator holds one (``meta_``), ``save``
writes it field by field, and every reader (``disalign eval``, the server at start-up, ``/admin/reload``,
its watcher) gets one from :func:`read_artifact`, so all of them refuse the same things with the same
sentence. A field is added here, once, and the spec documents it. On read:

- ``calibration.json`` against :class:`CalibrationMeta` by pydantic, strictly: no coercion (``"3"`` is
  not an int, ``"no"`` is not a bool), class names strings, a non-empty model fingerprint,
  ``background_index`` in 0..K-1 or null, the report fields that eval and the plots read typed, the
  label-shift fields well formed for K, and an unknown key refused;
- the tensors of ``parameters.safetensors``: float32 or float16 only, finite (then held as float32);
- the hyper-parameters against the estimator's own ``__init__`` annotations (strict as well);
- a **canary**: the loaded estimator calibrates a few fixed rows and must give finite logits and
  probabilities that sum to 1 (an ``alpha`` of 3e38 passes every check above and still gives NaN).

Directory layout and publishing are :mod:`disalign.calib.artifact.publish`; the estimator glue is :mod:`disalign.calib.estimators.base`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NotRequired

import torch
from pydantic import (
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
    with_config,
)
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from typing_extensions import TypedDict  # pydantic's own dependency; it needs this one below Python 3.12

from disalign.calib import json_text
from disalign.calib.artifact.publish import METADATA_FILE, PARAMETERS_FILE, artifact_dir
from disalign.calib.core import label_shift
from disalign.calib.errors import ArtifactError
from disalign.calib.files import read_regular_file

ARTIFACT_VERSION = 1
TENSOR_DTYPES = (torch.float32, torch.float16)
READ_ATTEMPTS = 3  # a version removed between resolving `current` and opening its files: resolve again
MAX_METADATA_BYTES = 64 * 2**20  # calibration.json: about 20 bytes per class name, a few KiB of report


# The nested objects are TypedDicts: pydantic checks them, and what the estimators and the plots hold is
# still the plain dict of the JSON (``report["rho"]``, ``report.get("head")``).
@with_config(ConfigDict(strict=True, extra="allow"))
class RhoPoint(TypedDict, total=False):
    """One point of DisAlign's ρ search (the ρ plot reads these)."""

    rho: float
    train_loss: float | None
    val_mean_class_accuracy: float | None
    val_accuracy: float | None
    val_nll: float | None


@with_config(ConfigDict(strict=True, extra="allow"))
class FitReport(TypedDict, total=False):
    """The fit report: the fields ``disalign fit``/``eval`` and the plots read are typed, others are free."""

    rho: float | None
    tau: float | None
    rho_curve: list[RhoPoint] | None
    validation: dict[str, Any] | None  # printed by `disalign fit`; its values vary by method
    fit_seconds: float | None
    epoch_seconds: list[float] | None


@with_config(ConfigDict(strict=True, extra="allow"))
class ProbabilityCalibrationFields(TypedDict):
    """BCTS p = softmax(z / T + b) as stored (:class:`disalign.calib.core.label_shift.ProbabilityCalibration`)."""

    temperature: float
    bias: list[float]  # (K,)
    bias_penalty: NotRequired[float | None]


@dataclass
class CalibrationMeta:
    """``calibration.json``: what a fitted estimator knows about the bank and model it was fitted on.

    A plain dataclass, so that a fit fills it in before it is complete (no fingerprint yet, say) and
    ``dataclasses.asdict`` / ``replace`` work; pydantic checks it where it crosses the file:
    :func:`check_metadata`, on save and on read.
    """

    method: Annotated[StrictStr, Field(min_length=1)]
    num_classes: Annotated[StrictInt, Field(ge=1)]
    feature_dim: Annotated[StrictInt, Field(ge=1)]
    class_names: list[StrictStr]
    model_fingerprint: Annotated[StrictStr, Field(min_length=1)]  # of the stage-1 model the banks came from
    hyperparameters: dict[str, Any]  # checked against the estimator's __init__ by check_hyperparameters
    background_index: StrictInt | None = None
    class_counts: list[StrictInt] | None = None
    report: FitReport = field(default_factory=dict)  # ρ curve, validation metrics, timings …
    artifact_version: StrictInt = ARTIFACT_VERSION
    created: StrictStr = ""
    preprocessing: dict[str, Any] | None = None  # the training bank's, so the server can use the same
    # Label shift (disalign.calib.core.label_shift): BCTS fitted on the val bank, and the class prior (K,)
    # the predictions are aligned to (set by `disalign adapt --out`; None = balanced). Optional: an artifact
    # written before them loads with None.
    probability_calibration: ProbabilityCalibrationFields | None = None
    target_prior: list[StrictFloat] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_keys_and_label_shift(cls, raw: Any) -> Any:
        """Checked on the raw object, before the field types: an unknown key, and the label-shift fields,
        whose sentences name the sub-field at fault (``probability_calibration.temperature should be …``)."""
        if not isinstance(raw, dict):
            return raw
        known = metadata_fields()
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (artifact version {ARTIFACT_VERSION} has {', '.join(sorted(known))})")
        k = raw.get("num_classes")
        if type(k) is int and k >= 1:  # else the field's own check names it
            check_label_shift_fields(raw.get("probability_calibration"), raw.get("target_prior"), k)
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationMeta:
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


def metadata_fields() -> set[str]:
    """The keys of ``calibration.json``."""
    return {f.name for f in dataclasses.fields(CalibrationMeta)}


def check_label_shift_fields(probability_calibration: object, target_prior: object, num_classes: int) -> None:
    """``probability_calibration`` and ``target_prior`` (None allowed) of calibration metadata for K classes;
    raises ValueError with the sentence (the model turns it into an :class:`ArtifactError`).

    Ranges, not only types: the server computes z / T + b + log π in float32 for every answer with a prior,
    so a temperature or bias that is a valid float but overflows that (``1e-300``, ``1e300``) is refused
    here (:data:`~disalign.calib.core.label_shift.TEMPERATURE_RANGE`, ``MAX_ABS_BIAS``), and so is a prior
    whose sum is not finite (``[1e308] * K`` normalises to zeros).
    """
    raw = probability_calibration
    if raw is not None:
        if not isinstance(raw, dict) or not {"temperature", "bias"} <= set(raw):
            raise ValueError(f"probability_calibration should be an object with 'temperature' and 'bias', found {raw!r:.80}")
        temperature, bias = raw["temperature"], raw["bias"]
        low, high = label_shift.TEMPERATURE_RANGE
        if not _is_number(temperature) or not low <= temperature <= high:
            raise ValueError(f"probability_calibration.temperature should be a number in [{low:g}, {high:g}], found {temperature!r}")
        limit = label_shift.MAX_ABS_BIAS
        if (not isinstance(bias, list) or len(bias) != num_classes
                or not all(_is_number(v) and abs(v) <= limit for v in bias)):
            raise ValueError(f"probability_calibration.bias should be {num_classes} finite numbers within ±{limit:g}, found {bias!r:.80}")
        penalty = raw.get("bias_penalty", 0.0)
        if penalty is not None and (not _is_number(penalty) or penalty < 0):
            raise ValueError(f"probability_calibration.bias_penalty should be a finite number >= 0 or null, found {penalty!r:.40}")
    if target_prior is not None and (not isinstance(target_prior, list) or len(target_prior) != num_classes
                                     or not all(_is_number(v) and v >= 0 for v in target_prior)
                                     or not 0 < sum(target_prior) < math.inf):
        raise ValueError(f"target_prior should be {num_classes} finite numbers >= 0 with a positive, finite sum, found {target_prior!r:.80}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_METADATA = TypeAdapter(CalibrationMeta)


def check_metadata(raw: Any, where: str) -> CalibrationMeta:
    """Parsed ``calibration.json`` checked against :class:`CalibrationMeta` → the metadata.

    It holds the values exactly as written (validation would turn an int in a float field into a float
    and reorder the report's keys), so an artifact loaded and saved again keeps its contents.
    """
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where} should hold a JSON object, found {type(raw).__name__}.")
    try:
        _METADATA.validate_python(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{where}: {error_sentence(exc)}") from None
    return CalibrationMeta(**raw)


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
    """Calibrate fixed rows (zeros, unit and large random features and logits) as serving does: finite logits
    and probabilities summing to 1, for the calibration's own predictions (with its ``target_prior``, if
    any) *and* for them aligned to a skewed class prior through its ``probability_calibration``
    (z / T + b + log π in float32, what the server computes for every answer with a prior)."""
    meta = calibrator.meta_
    k, d = meta.num_classes, meta.feature_dim
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.0, 1.0, 10.0, 30.0]).repeat_interleave(2)[:, None]  # (8, 1)
    features = torch.randn(8, d, generator=generator) * scales
    logits = torch.randn(8, k, generator=generator) * scales
    try:
        calibrated = torch.as_tensor(calibrator.predict_logits(features, logits))  # (8, K)
        outputs = [calibrated]
        if meta.probability_calibration is not None and meta.target_prior is None:
            fitted = label_shift.ProbabilityCalibration.from_json(meta.probability_calibration)
            skewed = torch.linspace(1.0, 0.0, k, dtype=torch.float64) if k > 1 else torch.ones(1, dtype=torch.float64)  # a 0: floored
            outputs.append(label_shift.adjust_to_prior(calibrated, skewed, fitted).float())
    except Exception as exc:  # a parameter the method cannot use: still one sentence
        raise ArtifactError(f"{where}: the calibration fails on test rows ({type(exc).__name__}: {exc}).") from None
    for output in outputs:
        probabilities = torch.softmax(output, dim=1)
        if not (torch.isfinite(output).all() and torch.isfinite(probabilities).all()
                and torch.allclose(probabilities.sum(dim=1), torch.ones(8), atol=1e-4)):
            raise ArtifactError(f"{where}: the calibration gives NaN, inf or unnormalised probabilities on test rows "
                                "(its parameters are out of range).")


def version_name(params: dict[str, torch.Tensor], meta: CalibrationMeta) -> str:
    """``<method>-<12 hex>``: a digest of the parameters and the metadata, the same for the same artifact on
    every reader (what a server reports as its calibration version, and a published prior is bound to)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(params):
        tensor = params[name].detach().to(torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(json.dumps(dataclasses.asdict(meta), sort_keys=True, default=str).encode())
    return f"{meta.method}-{digest.hexdigest()[:12]}"


def artifact_bytes(params: dict[str, torch.Tensor], metadata: dict[str, Any], method: str) -> dict[str, bytes]:
    """The two files of an artifact as bytes (written by :func:`disalign.calib.artifact.publish.publish`)."""
    return {PARAMETERS_FILE: save_tensors(params, metadata={"method": method}),
            METADATA_FILE: (json.dumps(metadata, indent=2) + "\n").encode()}


def read_files(directory: str | os.PathLike) -> tuple[Path, Any, dict[str, torch.Tensor]]:
    """``(version directory, parsed calibration.json, raw tensors)``, both files from one resolved version.

    Each must be a regular file (:func:`~disalign.calib.files.read_regular_file`: a FIFO or a device is refused
    without waiting on it), and calibration.json at most :data:`MAX_METADATA_BYTES` and nested at most
    :data:`~disalign.calib.json_text.MAX_DEPTH` levels.
    """
    for attempt in range(READ_ATTEMPTS):
        source = artifact_dir(directory)
        try:
            meta_text = read_regular_file(source / METADATA_FILE, ArtifactError, max_bytes=MAX_METADATA_BYTES)
            params_data = read_regular_file(source / PARAMETERS_FILE, ArtifactError)
            break
        except FileNotFoundError as exc:
            if attempt == READ_ATTEMPTS - 1:
                raise ArtifactError(f"{directory} is not a calibration directory: {exc.filename} is missing.") from None
    try:
        raw = json_text.loads(meta_text, str(source / METADATA_FILE), ArtifactError)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{source / METADATA_FILE} is not valid JSON ({exc}).") from None
    try:
        params = load_tensors(params_data)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ArtifactError(f"{source / PARAMETERS_FILE} is not a readable safetensors file ({exc}).") from None
    return source, raw, params


def read_artifact(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CalibrationMeta]:
    """The checked tensors and metadata of the current version of a calibration directory (both files from
    one version); what :meth:`Calibrator.load`, ``load_calibration`` and the server read."""
    source, raw, params = read_files(directory)
    meta = check_metadata(raw, str(source / METADATA_FILE))
    return check_tensors(params, str(source / PARAMETERS_FILE)), meta


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
