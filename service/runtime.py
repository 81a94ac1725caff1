"""The serving runtime: the loaded model, the current calibration, and the inference functions.

Domain objects only (no HTTP): the routers turn requests into tensors, call these, and turn results
into response schemas. The current calibration is one immutable :class:`~disalign.service.state.CalibrationState`;
a reload swaps the reference atomically, and every request or batch takes one snapshot of it, so a response is
always computed with a single calibration version, which it reports. Each batch, of rows or of images, is
aligned here to the served class prior (:mod:`disalign.service.prior`), on the rows of the requests that
did not ask for ``prior=balanced``; the result names the prior version it used.

Shapes: features (N, d), logits (N, K), images (N, 3, H, W) uint8 before normalisation.

Two micro-batchers. Images (``/predict``) share a forward pass on the inference thread with the images
queued while the previous pass ran (and, with ``max_wait_ms``, those arriving soon after). Rows of
stage-1 outputs (``/calibrate``, ``/v2`` tensors) never wait: a batch is whatever rows arrived while the
previous batch ran, so the per-call cost of the head is paid once per batch; small batches run on the
event loop, large ones on a calibration thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disalign.calib.artifact.format import version_name
from disalign.calib.errors import ArtifactError, DisalignError, InputError
from disalign.calib.estimators.base import Calibrator
from disalign.calib.estimators.methods import load_calibration
from disalign.feature_extract.models import LoadedModel, load_model
from disalign.feature_extract.preprocess import Preprocessing, clean_view, decode_image, normalize
from disalign.service.batcher import MicroBatcher
from disalign.service.metrics import ServiceMetrics
from disalign.service.preprocessing import (
    check_same_preprocessing,
    recorded_preprocessing,
    serving_preprocessing,
)
from disalign.service.prior import PriorTracker
from disalign.service.settings import Settings
from disalign.service.state import CalibrationState

log = logging.getLogger("service")


# Row batches up to this many logits (rows × K) are calibrated on the event loop (≈0.2 ms, less than a
# thread hop); larger ones on the calibration thread.
INLINE_LOGITS = 32_768


class IncompatibleCalibration(ArtifactError):
    """A readable calibration artifact that does not fit the served model (K, d or fingerprint)."""


@dataclass(frozen=True)
class ImageRequest:
    """One request's images (n, 3, H, W) uint8, decoded and resized."""

    images: torch.Tensor
    use_prior: bool = True  # False: the request asked for prior=balanced
    source: str | None = None  # the trusted traffic source that sent it (disalign.service.traffic); None: untrusted


@dataclass(frozen=True)
class ImageResult:
    """What one request's images give: stage-1 and calibrated logits (n, K), the calibration and prior versions used."""

    raw_logits: torch.Tensor
    calibrated_logits: torch.Tensor  # aligned to the served prior, unless the request asked for prior=balanced
    calibration: CalibrationState
    prior_version: str = "balanced"


@dataclass(frozen=True)
class RowRequest:
    """One request's rows of stage-1 outputs: features (n, d) and logits (n, K) float32, finite; top-k size (0: none)."""

    features: np.ndarray
    logits: np.ndarray
    top_k: int = 0
    use_prior: bool = True  # False: the request asked for prior=balanced
    source: str | None = None  # the trusted traffic source that sent it (disalign.service.traffic); None: untrusted


@dataclass(frozen=True)
class RowResult:
    """Calibrated logits and probabilities (n, K) float32, top-k indices (n, k) and probabilities (n, k), version used."""

    logits: np.ndarray
    probabilities: np.ndarray
    top_indices: np.ndarray
    top_probabilities: np.ndarray
    calibration: CalibrationState
    prior_version: str = "balanced"


def calibration_version(calibrator: Calibrator) -> str:
    """``<method>-<12 hex>``: a digest of the parameters and the metadata, stable across reloads of the same artifact
    (:func:`disalign.calib.artifact.format.version_name`; a published prior names it)."""
    return version_name(calibrator.params_, calibrator.meta_)


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


def row_flags(use_prior: Sequence[bool], rows: Sequence[int]) -> torch.Tensor | bool:
    """The per-row ``use_prior`` of a batch from its requests' flags and row counts: one bool when all agree, else (N,) bool."""
    if all(use_prior) or not any(use_prior):
        return use_prior[0]
    return torch.from_numpy(np.repeat(np.array(use_prior), rows))


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
                                    max_wait_ms=settings.max_wait_ms, rows=lambda request: int(request.images.shape[0]),
                                    on_batch=metrics.batch_size.observe)
        self.row_batcher = MicroBatcher(self._calibrate_batch, max_batch=settings.max_rows, max_wait_ms=0.0,
                                        rows=lambda request: request.features.shape[0], thread_name="disalign-calibrate",
                                        inline_rows=0)  # set in load(), once K is known
        self.prior = PriorTracker(settings, metrics.prior, lambda: self.calibration)

    # -- start-up (called from the lifespan, on the inference thread) ---------------------------
    def load(self) -> None:
        """Load the model and the calibration; raises a DisalignError with one sentence if they do not fit."""
        s = self.settings
        torch.set_num_threads(s.torch_threads)
        calibrator = read_calibration(s.calibration)
        self.preprocessing = serving_preprocessing(s.card, s.preprocessing, calibrator.meta_.preprocessing)
        self.model = load_model(s.model, s.weights, classifier_layer=s.classifier_layer, device=s.device,
                                input_size=self.preprocessing.crop, model_args=s.model_args)
        self.calibration = check_calibration(calibrator, self.model, s.model_name, self.preprocessing)
        self.row_batcher.inline_rows = INLINE_LOGITS // self.model.num_classes
        self.prior.start(self.calibration)
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
        self._forward_batch([ImageRequest(torch.zeros((1, 3, h, w), dtype=torch.uint8))])
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
            # Not validated again: each request's rows were checked (shapes, finite) by its router.
            calibrated = state.calibrator.predict_logits(torch.from_numpy(features), torch.from_numpy(logits), validate=False)  # (N, K)
            sizes = [r.features.shape[0] for r in requests]
            flags = row_flags([r.use_prior for r in requests], sizes)
            calibrated, prior = self.prior.apply(calibrated, flags, state, requests=len(requests),
                                                 sources=[(r.source, n) for r, n in zip(requests, sizes, strict=True)])
            probabilities = torch.softmax(calibrated, dim=1)
            top_p, top_i = probabilities.topk(k, dim=1)  # (N, k), k = 0 included
        out, start = [], 0
        arrays = [calibrated.numpy(), probabilities.numpy(), top_i.numpy(), top_p.numpy()]
        for r in requests:
            stop = start + r.features.shape[0]
            z, p, i, q = (a[start:stop] for a in arrays)
            out.append(RowResult(z, p, i[:, :r.top_k], q[:, :r.top_k], state, prior.version_for(r.use_prior)))
            start = stop
        return out

    def image_tensor(self, blobs: list[bytes]) -> torch.Tensor:
        """Decode and resize a request's images → (n, 3, H, W) uint8; raises ImageDecodeError / ImageTooLargeError."""
        prep, limit = self.preprocessing, self.settings.max_pixels
        views = [clean_view(decode_image(blob, max_pixels=limit, draft_size=prep.draft_size), prep) for blob in blobs]
        return torch.stack(views)

    async def classify(self, images: torch.Tensor, use_prior: bool = True, source: str | None = None) -> ImageResult:
        """Run a request's images (n, 3, H, W) uint8 through the micro-batcher (``use_prior``: align to the served
        prior; ``source``: the trusted traffic source that sent them, if any)."""
        return await self.batcher.submit(ImageRequest(images, use_prior, source))

    def _forward_batch(self, requests: list[ImageRequest]) -> list[ImageResult]:
        """Inference thread: one forward pass (in chunks of max_batch) for all requests of a batch."""
        state = self.calibration  # one snapshot for the whole batch
        sizes = [int(r.images.shape[0]) for r in requests]
        batch = torch.cat([r.images for r in requests])  # (B, 3, H, W) uint8
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
        calibrated, prior = self.prior.apply(calibrated, row_flags([r.use_prior for r in requests], sizes), state,
                                             requests=len(requests), sources=[(r.source, n) for r, n in zip(requests, sizes, strict=True)])
        return [ImageResult(r, c, state, prior.version_for(request.use_prior))
                for r, c, request in zip(raw.split(sizes), calibrated.split(sizes), requests, strict=True)]
