"""The serving runtime: the loaded model, the current calibration, and the inference functions.

Domain objects only (no HTTP): the routers turn requests into tensors, call these, and turn results
into response schemas. The current calibration is one immutable :class:`CalibrationState`; a reload
swaps the reference atomically, and every request or batch takes one snapshot of it, so a response is
always computed with a single calibration version, which it reports.

Shapes: features (N, d), logits (N, K), images (N, 3, H, W) uint8 before normalisation.

Two micro-batchers. Images (``/predict``) share a forward pass on the inference thread with the images
queued while the previous pass ran (and, with ``max_wait_ms``, those arriving soon after). Rows of
stage-1 outputs (``/calibrate``, ``/v2`` tensors) never wait: a batch is whatever rows arrived while the
previous batch ran, so the per-call cost of the head is paid once per batch; small batches run on the
event loop, large ones on a calibration thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from calib.errors import ArtifactError, DisalignError, InputError
from calib.estimator import CalibrationMeta, Calibrator
from calib.methods import load_calibration
from feature_extract.models import LoadedModel, load_model
from feature_extract.preprocess import Preprocessing, clean_view, decode_image, normalize
from service.batcher import MicroBatcher
from service.metrics import ServiceMetrics
from service.preprocessing import check_same_preprocessing, recorded_preprocessing, serving_preprocessing
from service.settings import Settings

log = logging.getLogger("service")


# Row batches up to this many logits (rows × K) are calibrated on the event loop (≈0.2 ms, less than a
# thread hop); larger ones on the calibration thread.
INLINE_LOGITS = 32_768


class IncompatibleCalibration(ArtifactError):
    """A readable calibration artifact that does not fit the served model (K, d or fingerprint)."""


@dataclass(frozen=True)
class CalibrationState:
    """One loaded calibration and its version; never mutated (a reload makes a new one)."""

    calibrator: Calibrator
    version: str

    @property
    def meta(self) -> CalibrationMeta:
        return self.calibrator.meta_

    @property
    def class_names(self) -> list[str]:
        return self.calibrator.meta_.class_names


@dataclass(frozen=True)
class ImageResult:
    """What one request's images give: stage-1 and calibrated logits (n, K), and the version used."""

    raw_logits: torch.Tensor
    calibrated_logits: torch.Tensor
    calibration: CalibrationState


@dataclass(frozen=True)
class RowRequest:
    """One request's rows of stage-1 outputs: features (n, d) and logits (n, K) float32, finite; top-k size (0: none)."""

    features: np.ndarray
    logits: np.ndarray
    top_k: int = 0


@dataclass(frozen=True)
class RowResult:
    """Calibrated logits and probabilities (n, K) float32, top-k indices (n, k) and probabilities (n, k), version used."""

    logits: np.ndarray
    probabilities: np.ndarray
    top_indices: np.ndarray
    top_probabilities: np.ndarray
    calibration: CalibrationState


def calibration_version(calibrator: Calibrator) -> str:
    """``<method>-<12 hex>``: a digest of the parameters and the metadata, stable across reloads of the same artifact."""
    digest = hashlib.sha256()
    for name in sorted(calibrator.params_):
        tensor = calibrator.params_[name].detach().to(torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(json.dumps(asdict(calibrator.meta_), sort_keys=True, default=str).encode())
    return f"{calibrator.meta_.method}-{digest.hexdigest()[:12]}"


def read_calibration(directory: Path) -> Calibrator:
    """Load the artifact; raises :class:`ArtifactError` (one sentence) whatever is wrong with it."""
    try:
        return load_calibration(directory)
    except DisalignError:
        raise
    except Exception as exc:  # unreadable file, bad hyper-parameters …: still one sentence
        raise ArtifactError(f"{directory} could not be read as a calibration ({type(exc).__name__}: {exc}).") from exc


def check_calibration(calibrator: Calibrator, model: LoadedModel, model_name: str,
                      preprocessing: Preprocessing | None = None) -> CalibrationState:
    """Refuse a calibration that does not fit the model (K, d, fingerprint) or whose banks were extracted with
    another preprocessing than ``preprocessing`` (when given); raises :class:`IncompatibleCalibration`."""
    try:
        calibrator.check_compatible(num_classes=model.num_classes, feature_dim=model.feature_dim,
                                    model_fingerprint=model.fingerprint, source=f"served model '{model_name}'")
        recorded = recorded_preprocessing(calibrator.meta_.preprocessing) if preprocessing is not None else None
        if recorded is not None:
            check_same_preprocessing(preprocessing, recorded, "served preprocessing")
    except ArtifactError as exc:
        raise IncompatibleCalibration(str(exc)) from None
    return CalibrationState(calibrator, calibration_version(calibrator))


class Runtime:
    """The model, its preprocessing, the current calibration and the micro-batcher of one server."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics):
        self.settings = settings
        self.metrics = metrics
        self.ready = False
        self.model: LoadedModel
        self.preprocessing: Preprocessing
        self.calibration: CalibrationState
        self.batcher = MicroBatcher(self._forward_batch, max_batch=settings.max_batch,
                                    max_wait_ms=settings.max_wait_ms, rows=lambda images: int(images.shape[0]),
                                    on_batch=metrics.batch_size.observe)
        self.row_batcher = MicroBatcher(self._calibrate_batch, max_batch=settings.max_rows, max_wait_ms=0.0,
                                        rows=lambda request: request.features.shape[0], thread_name="disalign-calibrate",
                                        inline_rows=0)  # set in load(), once K is known

    # -- start-up (called from the lifespan, on the inference thread) ---------------------------
    def load(self) -> None:
        """Load the model and the calibration; raises a DisalignError with one sentence if they do not fit."""
        s = self.settings
        torch.set_num_threads(s.torch_threads)
        calibrator = read_calibration(s.calibration)
        self.preprocessing = serving_preprocessing(s.card, s.preprocessing, calibrator.meta_.preprocessing)
        self.model = load_model(s.model, s.weights, classifier_layer=s.classifier_layer, device=s.device,
                                input_size=self.preprocessing.crop)
        self.calibration = check_calibration(calibrator, self.model, s.model_name, self.preprocessing)
        self.row_batcher.inline_rows = INLINE_LOGITS // self.model.num_classes
        self.metrics.set_model(s.model_name, self.model)
        self.metrics.set_calibration(self.calibration)
        log.info("loaded model %s (%s, K=%d, d=%d) and calibration %s", s.model_name, self.model.fingerprint[:19],
                 self.model.num_classes, self.model.feature_dim, self.calibration.version)

    def read_checked_calibration(self) -> CalibrationState:
        """Read the calibration directory again and check it against the served model and preprocessing (off the
        loop; the caller swaps it in with :meth:`swap_calibration`). Raises a one-sentence ArtifactError."""
        s = self.settings
        return check_calibration(read_calibration(s.calibration), self.model, s.model_name, getattr(self, "preprocessing", None))

    def swap_calibration(self, state: CalibrationState) -> None:
        """The swap: after it, every new request or batch, ``/metrics`` and the ``/v2`` metadata see ``state``."""
        self.calibration = state
        self.metrics.set_calibration(state)

    def warm_up(self) -> None:
        """One forward pass and one calibration on a blank image, so the first request is not slow."""
        h, w = self.preprocessing.crop
        self._forward_batch([torch.zeros((1, 3, h, w), dtype=torch.uint8)])
        k, d = self.model.num_classes, self.model.feature_dim
        self._calibrate_batch([RowRequest(np.zeros((1, d), np.float32), np.zeros((1, k), np.float32), 1)])

    # -- inference ------------------------------------------------------------------------------
    async def calibrate_rows(self, request: RowRequest) -> RowResult:
        """Calibrate a request's rows, batched with the rows of concurrent requests."""
        return await self.row_batcher.submit(request)

    def _calibrate_batch(self, requests: list[RowRequest]) -> list[RowResult]:
        """One head evaluation, softmax and top-k for the rows of all requests of a batch (on the loop or the calibration thread)."""
        state = self.calibration  # one snapshot for the whole batch
        if len(requests) == 1:
            features, logits = requests[0].features, requests[0].logits
        else:
            features = np.concatenate([r.features for r in requests])
            logits = np.concatenate([r.logits for r in requests])
        k = max(r.top_k for r in requests)
        with torch.inference_mode():
            calibrated = state.calibrator.predict_logits(torch.from_numpy(features), torch.from_numpy(logits))  # (N, K)
            probabilities = torch.softmax(calibrated, dim=1)
            top_p, top_i = probabilities.topk(k, dim=1)  # (N, k), k = 0 included
        out, start = [], 0
        arrays = [calibrated.numpy(), probabilities.numpy(), top_i.numpy(), top_p.numpy()]
        for r in requests:
            stop = start + r.features.shape[0]
            z, p, i, q = (a[start:stop] for a in arrays)
            out.append(RowResult(z, p, i[:, :r.top_k], q[:, :r.top_k], state))
            start = stop
        return out

    def image_tensor(self, blobs: list[bytes]) -> torch.Tensor:
        """Decode and resize a request's images → (n, 3, H, W) uint8; raises ImageDecodeError / ImageTooLargeError."""
        prep, limit = self.preprocessing, self.settings.max_pixels
        views = [clean_view(decode_image(blob, max_pixels=limit, draft_size=prep.draft_size), prep) for blob in blobs]
        return torch.stack(views)

    async def classify(self, images: torch.Tensor) -> ImageResult:
        """Run a request's images (n, 3, H, W) uint8 through the micro-batcher."""
        return await self.batcher.submit(images)

    def _forward_batch(self, requests: list[torch.Tensor]) -> list[ImageResult]:
        """Inference thread: one forward pass (in chunks of max_batch) for all requests of a batch."""
        state = self.calibration  # one snapshot for the whole batch
        sizes = [int(images.shape[0]) for images in requests]
        batch = torch.cat(requests)  # (B, 3, H, W) uint8
        raw_parts, feature_parts = [], []
        with torch.inference_mode():
            for chunk in batch.split(self.settings.max_batch):
                images = normalize(chunk.to(self.model.device, non_blocking=True), self.preprocessing)  # uint8 travels
                features, logits = self.model.features_and_logits(images)
                feature_parts.append(features.float().cpu())
                raw_parts.append(logits.float().cpu())
        features, raw = torch.cat(feature_parts), torch.cat(raw_parts)  # (B, d), (B, K)
        if not torch.isfinite(raw).all() or not torch.isfinite(features).all():
            raise InputError("the model produced NaN or inf for an image.")
        calibrated = state.calibrator.predict_logits(features, raw)
        return [ImageResult(r, c, state) for r, c in zip(raw.split(sizes), calibrated.split(sizes), strict=True)]
