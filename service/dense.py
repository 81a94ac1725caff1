"""Serving segmentation models and detectors: the dense runtime, its ``/predict`` answer and schemas.

The model card's ``task`` field picks the runtime (:func:`make_runtime`): ``"segmentation"`` or
``"detection"`` here, anything else the classification :class:`~disalign.service.runtime.Runtime`. A
:class:`DenseRuntime` is a Runtime whose model is a :class:`~disalign.feature_extract.segmentation.SegmentationModel`
or a :class:`~disalign.feature_extract.detection.Detector`, so ``/calibrate``, ``/v2`` metadata and feature rows,
``/admin/reload`` and the metrics work unchanged (a row is a pixel or a RoI); ``/predict`` answers:

- segmentation: per image the calibrated label map (PNG of class ids, base64, at the image's own size:
  the calibrated logit map upsampled as the model upsamples), the fraction of pixels of each predicted
  class, and with ``raw=true`` the stage-1 label map as well;
- detection: per image the boxes (x1 y1 x2 y2, image pixels), labels and calibrated scores after the
  detector's own post-processing (score threshold 1e-4, NMS, at most 300 per image), masks as COCO
  RLE when the detector has a mask head; with ``raw=true`` the stage-1 detections as well.

Images are decoded on a worker thread and micro-batched (one item per image) on the inference thread.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, Field

from disalign.calib.errors import InputError
from disalign.service.batcher import MicroBatcher
from disalign.service.metrics import ServiceMetrics
from disalign.service.offload import decode_images
from disalign.service.runtime import INLINE_LOGITS, Runtime, check_calibration, read_calibration
from disalign.service.settings import Settings
from disalign.service.state import CalibrationState

log = logging.getLogger("service")
DENSE_TASKS = ("segmentation", "detection")


def card_task(card: Path | None) -> str:
    """The ``task`` field of a model card; ``classification`` without a card, without the field, or for a card
    that cannot be read (the classification runtime then refuses to start with that card's own error)."""
    try:
        info = json.loads(Path(card).read_text()) if card is not None else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "classification"
    return str(info.get("task", "classification")) if isinstance(info, dict) else "classification"


def make_runtime(settings: Settings, metrics: ServiceMetrics) -> Runtime:
    """The runtime the card's task needs (a card with an unknown task gets a runtime that refuses to start)."""
    task = card_task(settings.card)
    return Runtime(settings, metrics) if task == "classification" else DenseRuntime(settings, metrics, task)


# -- schemas ----------------------------------------------------------------------------------------
class ClassFraction(BaseModel):
    label: str
    index: int
    fraction: float = Field(description="share of the image's pixels predicted as this class")


class SegmentationResult(BaseModel):
    height: int
    width: int
    label_map: str = Field(description="PNG (8-bit, or 16-bit for K > 256) of class ids, base64")
    classes: list[ClassFraction] = Field(description="predicted classes by decreasing pixel fraction")
    raw_label_map: str | None = Field(None, description="stage-1 label map (with raw=true)")
    raw_classes: list[ClassFraction] | None = None


class Detection(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in image pixels")
    label: str
    index: int = Field(description="class index, 1..K (0 is the background)")
    score: float
    mask: dict | None = Field(None, description="COCO uncompressed RLE {size: [H, W], counts} when the detector has a mask head")


class DetectionResult(BaseModel):
    height: int
    width: int
    detections: list[Detection] = Field(description="calibrated detections by decreasing score")
    raw_detections: list[Detection] | None = Field(None, description="stage-1 detections (with raw=true)")


class DensePredictResponse(BaseModel):
    model_name: str
    calibration_version: str
    task: str
    predictions: list[SegmentationResult] | list[DetectionResult] = Field(description="one entry per image, in request order")


# -- runtime ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseRequest:
    """The images of one request, decoded RGB (H, W, 3) uint8, and whether the stage-1 answers are wanted."""

    images: list[np.ndarray]
    raw: bool


@dataclass(frozen=True)
class DenseResult:
    """Per image of a request: label maps (H, W) or torchvision detection dicts, and the calibration used."""

    calibrated: list
    raw: list | None
    calibration: CalibrationState


def png_base64(labels: np.ndarray) -> str:
    """(H, W) class ids → base64 PNG (8-bit when they fit, else 16-bit)."""
    mode_dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    buffer = io.BytesIO()
    Image.fromarray(labels.astype(mode_dtype)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def class_fractions(labels: np.ndarray, class_names: list[str]) -> list[ClassFraction]:
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    order = np.argsort(-counts, kind="stable")
    return [ClassFraction(label=class_names[i], index=int(i), fraction=float(counts[i]) / labels.size) for i in order if counts[i]]


class DenseRuntime(Runtime):
    """A :class:`Runtime` for a segmentation model or a detector (``task``)."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, task: str):
        super().__init__(settings, metrics)
        self.task = task
        self.batcher = MicroBatcher(self._forward_dense, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                                    rows=lambda request: len(request.images), on_batch=metrics.batch_size.observe)

    def load(self) -> None:
        s = self.settings
        if self.task not in DENSE_TASKS:
            raise InputError(f"model card {s.card}: 'task' should be classification, segmentation or detection, found {self.task!r}.")
        torch.set_num_threads(s.torch_threads)
        if s.prior != "balanced":
            raise InputError(f"DISALIGN_PRIOR={s.prior} applies to classifiers; a {self.task} model is served balanced.")
        if self.task == "segmentation":
            from disalign.feature_extract.preprocess import Preprocessing
            from disalign.feature_extract.segmentation import load_segmentation_model

            self.preprocessing = Preprocessing.from_card(s.card)
            self.model = load_segmentation_model(s.model, s.weights, device=s.device)
        else:
            from disalign.feature_extract.detection import load_detector

            self.model = load_detector(s.model, s.weights, card=s.card, device=s.device)
        self.calibration = check_calibration(read_calibration(s.calibration), self.model, s.model_name)
        self.row_batcher.inline_rows = INLINE_LOGITS // self.model.num_classes
        if self.task == "detection" and self.calibration.meta.background_index not in (None, 0):
            raise InputError(f"the calibration has background_index {self.calibration.meta.background_index}; torchvision detectors use 0.")
        self.metrics.set_model(s.model_name, self.model)
        self.metrics.set_calibration(self.calibration)
        log.info("loaded %s model %s (K=%d, d=%d) and calibration %s", self.task, s.model_name, self.model.num_classes,
                 self.model.feature_dim, self.calibration.version)

    def warm_up(self) -> None:
        size = self.preprocessing.crop if self.task == "segmentation" else (64, 64)
        self._forward_dense([DenseRequest([np.zeros((*size, 3), np.uint8)], raw=True)])

    def decode(self, blobs: list[bytes]) -> list[np.ndarray]:
        """Decode a request's images → RGB (H, W, 3) uint8; raises ImageDecodeError / ImageTooLargeError."""
        from disalign.feature_extract.preprocess import decode_image

        return [np.array(decode_image(blob, max_pixels=self.settings.max_pixels)) for blob in blobs]

    async def classify(self, images, use_prior=True, source=None):  # /v2 image input
        raise InputError(f"this server serves a {self.task} model: send images to /predict (the /v2 image input is for classifiers).")

    async def predict(self, request: DenseRequest) -> DenseResult:
        """Run a request's images through the micro-batcher (one calibration version for all of them)."""
        return await self.batcher.submit(request)

    def _forward_dense(self, requests: list[DenseRequest]) -> list[DenseResult]:
        """Inference thread: one pass for all images of a batch of requests, split back per request."""
        state = self.calibration  # one snapshot for the whole batch
        images = [image for request in requests for image in request.images]
        want_raw = any(request.raw for request in requests)
        with torch.inference_mode():
            forward = self._segment if self.task == "segmentation" else self._detect
            calibrated, raw = forward(images, state, want_raw)
        out, start = [], 0
        for request in requests:
            stop = start + len(request.images)
            out.append(DenseResult(calibrated[start:stop], raw[start:stop] if request.raw else None, state))
            start = stop
        return out

    def _segment(self, images: list[np.ndarray], state: CalibrationState, want_raw: bool) -> tuple[list, list]:
        """Label maps (H, W) of the calibrated and (if wanted) stage-1 logits, upsampled as the model does."""
        from disalign.feature_extract.preprocess import normalize

        prep, model = self.preprocessing, self.model
        h_in, w_in = prep.crop
        x = torch.stack([torch.from_numpy(np.array(Image.fromarray(image).resize((w_in, h_in), Image.Resampling.BILINEAR)))
                         for image in images]).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8
        features, logits = model.features_and_logits(normalize(x, prep).to(model.device))  # (B, d, h, w), (B, K, h, w)
        b, d, h, w = features.shape
        k = logits.shape[1]
        rows = features.permute(0, 2, 3, 1).reshape(-1, d).cpu()  # (B·h·w, d): one row per pixel
        raw = logits.permute(0, 2, 3, 1).reshape(-1, k).cpu()
        if not (torch.isfinite(rows).all() and torch.isfinite(raw).all()):
            raise InputError("the model produced NaN or inf for an image.")
        calibrated = state.calibrator.predict_logits(rows, raw).reshape(b, h, w, k).permute(0, 3, 1, 2)  # (B, K, h, w)
        raw_maps = raw.reshape(b, h, w, k).permute(0, 3, 1, 2)

        def label_map(maps: torch.Tensor, i: int) -> np.ndarray:
            size = images[i].shape[:2]
            return F.interpolate(maps[i:i + 1], size=size, mode="bilinear", align_corners=False)[0].argmax(0).numpy()

        return ([label_map(calibrated, i) for i in range(b)], [label_map(raw_maps, i) for i in range(b)] if want_raw else [])

    def _detect(self, images: list[np.ndarray], state: CalibrationState, want_raw: bool) -> tuple[list, list]:
        """Detections with the calibrated head inside the detector's post-processing (and the stage-1 head if wanted)."""
        from disalign.calib.evaluation.detection import run_heads

        det = self.model
        x = [torch.from_numpy(image).permute(2, 0, 1).float().div(255).to(det.device) for image in images]
        heads = {"calibrated": state.calibrator, **({"raw": None} if want_raw else {})}
        out = run_heads(det.module, x, heads)  # one backbone and RPN pass for both heads
        return out["calibrated"], out.get("raw", [])


def detections(output: dict[str, torch.Tensor], class_names: list[str]) -> list[Detection]:
    """torchvision outputs of one image → schema objects (masks as COCO RLE)."""
    from disalign.calib.evaluation.detection import encode_mask

    masks = output.get("masks")
    return [Detection(box=[round(v, 2) for v in box], label=class_names[label], index=label, score=score,
                      mask=encode_mask(masks[i, 0].cpu().numpy() >= 0.5) if masks is not None else None)
            for i, (box, label, score) in enumerate(zip(output["boxes"].tolist(), output["labels"].tolist(),
                                                        output["scores"].tolist(), strict=True))]


async def predict_dense(runtime: DenseRuntime, blobs: list[bytes], raw: bool) -> DensePredictResponse:
    """The ``/predict`` answer of a dense runtime for a request's image files."""
    images = await decode_images(runtime.decode, blobs)
    result = await runtime.predict(DenseRequest(images, raw))
    names = result.calibration.class_names
    predictions: list = []
    for i, image in enumerate(images):
        height, width = image.shape[:2]
        stage1 = result.raw[i] if result.raw is not None else None
        if runtime.task == "segmentation":
            labels = result.calibrated[i]
            predictions.append(SegmentationResult(
                height=height, width=width, label_map=png_base64(labels), classes=class_fractions(labels, names),
                raw_label_map=png_base64(stage1) if stage1 is not None else None,
                raw_classes=class_fractions(stage1, names) if stage1 is not None else None))
        else:
            predictions.append(DetectionResult(height=height, width=width, detections=detections(result.calibrated[i], names),
                                               raw_detections=detections(stage1, names) if stage1 is not None else None))
    return DensePredictResponse(model_name=runtime.settings.model_name, calibration_version=result.calibration.version,
                                task=runtime.task, predictions=predictions)
