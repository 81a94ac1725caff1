"""Serving segmentation models and detectors: the dense runtime, its ``/predict`` answer and schemas.

The model card's ``task`` field picks the runtime (:func:`make_runtime`): ``"segmentation"`` or
``"detection"`` here, anything else the classification :class:`~service.runtime.Runtime`. A
:class:`DenseRuntime` is a Runtime whose model is a :class:`~feature_extract.segmentation.SegmentationModel`
or a :class:`~feature_extract.detection.Detector`, so ``/calibrate``, ``/v2`` metadata and feature rows,
``/admin/reload`` and the metrics work unchanged (a row is a pixel or a RoI); ``/predict`` answers:

- segmentation: per image the calibrated label map (PNG of class ids, base64, at the image's own size:
  the calibrated logit map upsampled as the model upsamples), the fraction of pixels of each predicted
  class, and with ``raw=true`` the stage-1 label map as well;
- detection: per image the boxes (x1 y1 x2 y2, image pixels), labels and calibrated scores after the
  detector's own post-processing (score threshold 1e-4, NMS, at most ``max_detections``), masks as COCO
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

from calib.errors import InputError
from service.batcher import MicroBatcher
from service.metrics import ServiceMetrics
from service.runtime import CalibrationState, Runtime, check_calibration, read_calibration
from service.settings import Settings

log = logging.getLogger("service")
DENSE_TASKS = ("segmentation", "detection")
DETECTION_SCORE_THRESHOLD = 1e-4


def card_task(card: Path | None) -> str:
    """The ``task`` of a model card (``classification`` without a card or field); one sentence if unreadable."""
    if card is None:
        return "classification"
    try:
        task = json.loads(Path(card).read_text()).get("task", "classification")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise InputError(f"model card {card} is not a readable JSON object ({exc}).") from exc
    if task not in ("classification", *DENSE_TASKS):
        raise InputError(f"model card {card}: 'task' should be classification, segmentation or detection, found {task!r}.")
    return task


def make_runtime(settings: Settings, metrics: ServiceMetrics) -> Runtime:
    """The runtime the card's task needs."""
    task = card_task(settings.card)
    return DenseRuntime(settings, metrics, task) if task in DENSE_TASKS else Runtime(settings, metrics)


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
class DenseItem:
    """One image of a request: the decoded RGB (H, W, 3) uint8 and whether the stage-1 answer is wanted."""

    image: np.ndarray
    raw: bool


@dataclass(frozen=True)
class DenseResult:
    calibrated: object  # (H, W) int64 label map, or a list of detection dicts
    raw: object | None
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
                                    rows=lambda item: 1, on_batch=metrics.batch_size.observe)

    def load(self) -> None:
        s = self.settings
        torch.set_num_threads(s.torch_threads)
        if self.task == "segmentation":
            from feature_extract.preprocess import Preprocessing
            from feature_extract.segmentation import load_segmentation_model

            self.preprocessing = Preprocessing.from_card(s.card)
            self.model = load_segmentation_model(s.model, s.weights, device=s.device)
        else:
            from feature_extract.detection import load_detector

            self.model = load_detector(s.model, s.weights, card=s.card, device=s.device)
            self.model.module.roi_heads.score_thresh = DETECTION_SCORE_THRESHOLD
        self.calibration = check_calibration(read_calibration(s.calibration), self.model, s.model_name)
        if self.task == "detection" and self.calibration.meta.background_index not in (None, 0):
            raise InputError(f"the calibration has background_index {self.calibration.meta.background_index}; torchvision detectors use 0.")
        self.metrics.set_model(s.model_name, self.model)
        self.metrics.set_calibration(self.calibration)
        log.info("loaded %s model %s (K=%d, d=%d) and calibration %s", self.task, s.model_name, self.model.num_classes,
                 self.model.feature_dim, self.calibration.version)

    def warm_up(self) -> None:
        size = self.preprocessing.crop if self.task == "segmentation" else (64, 64)
        self._forward_dense([DenseItem(np.zeros((*size, 3), np.uint8), raw=False)])

    def decode(self, blobs: list[bytes]) -> list[np.ndarray]:
        """Decode a request's images → RGB (H, W, 3) uint8; raises ImageDecodeError / ImageTooLargeError."""
        from feature_extract.preprocess import decode_image

        return [np.array(decode_image(blob, max_pixels=self.settings.max_pixels)) for blob in blobs]

    async def classify(self, images):  # /v2 image input
        raise InputError(f"this server serves a {self.task} model: send images to /predict (the /v2 image input is for classifiers).")

    async def predict(self, items: list[DenseItem]) -> list[DenseResult]:
        import asyncio

        return list(await asyncio.gather(*(self.batcher.submit(item) for item in items)))

    def _forward_dense(self, items: list[DenseItem]) -> list[DenseResult]:
        state = self.calibration  # one snapshot for the whole batch
        with torch.inference_mode():
            if self.task == "segmentation":
                return self._segment(items, state)
            return self._detect(items, state)

    def _segment(self, items: list[DenseItem], state: CalibrationState) -> list[DenseResult]:
        from feature_extract.preprocess import normalize

        prep, model = self.preprocessing, self.model
        h_in, w_in = prep.crop
        x = torch.stack([torch.from_numpy(np.array(Image.fromarray(it.image).resize((w_in, h_in), Image.Resampling.BILINEAR)))
                         for it in items]).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8
        features, logits = model.features_and_logits(normalize(x, prep).to(model.device))  # (B, d, h, w), (B, K, h, w)
        b, d, h, w = features.shape
        k = logits.shape[1]
        rows = features.permute(0, 2, 3, 1).reshape(-1, d).cpu()
        raw = logits.permute(0, 2, 3, 1).reshape(-1, k).cpu()
        if not (torch.isfinite(rows).all() and torch.isfinite(raw).all()):
            raise InputError("the model produced NaN or inf for an image.")
        calibrated = state.calibrator.predict_logits(rows, raw).reshape(b, h, w, k).permute(0, 3, 1, 2)  # (B, K, h, w)
        raw_maps = raw.reshape(b, h, w, k).permute(0, 3, 1, 2)
        out = []
        for i, it in enumerate(items):
            size = it.image.shape[:2]
            up = lambda m: F.interpolate(m[i:i + 1], size=size, mode="bilinear", align_corners=False)[0].argmax(0).numpy()  # noqa: E731
            out.append(DenseResult(up(calibrated), up(raw_maps) if it.raw else None, state))
        return out

    def _detect(self, items: list[DenseItem], state: CalibrationState) -> list[DenseResult]:
        from calib.detection_eval import calibrated_head

        det = self.model
        images = [torch.from_numpy(it.image).permute(2, 0, 1).float().div(255).to(det.device) for it in items]
        with calibrated_head(det.module, state.calibrator, detections_per_image=self.settings.max_detections
                             if hasattr(self.settings, "max_detections") else 100) as module:
            calibrated = module(images)
        raw = None
        if any(it.raw for it in items):
            with calibrated_head(det.module, None, detections_per_image=getattr(self.settings, "max_detections", 100)) as module:
                raw = module(images)
        return [DenseResult(calibrated[i], raw[i] if raw is not None and it.raw else None, state) for i, it in enumerate(items)]


def detections(output: dict[str, torch.Tensor], class_names: list[str]) -> list[Detection]:
    """torchvision outputs of one image → schema objects (masks as COCO RLE)."""
    from calib.detection_eval import encode_mask

    masks = output.get("masks")
    return [Detection(box=[round(v, 2) for v in box], label=class_names[label], index=label, score=score,
                      mask=encode_mask(masks[i, 0].cpu().numpy() >= 0.5) if masks is not None else None)
            for i, (box, label, score) in enumerate(zip(output["boxes"].tolist(), output["labels"].tolist(),
                                                        output["scores"].tolist(), strict=True))]


async def predict_dense(runtime: DenseRuntime, blobs: list[bytes], raw: bool) -> DensePredictResponse:
    """The ``/predict`` answer of a dense runtime for a request's image files."""
    from starlette.concurrency import run_in_threadpool

    images = await run_in_threadpool(runtime.decode, blobs)
    results = await runtime.predict([DenseItem(image, raw) for image in images])
    state = results[0].calibration
    names = state.class_names
    predictions: list = []
    for image, result in zip(images, results, strict=True):
        height, width = image.shape[:2]
        if runtime.task == "segmentation":
            predictions.append(SegmentationResult(
                height=height, width=width, label_map=png_base64(result.calibrated), classes=class_fractions(result.calibrated, names),
                raw_label_map=png_base64(result.raw) if result.raw is not None else None,
                raw_classes=class_fractions(result.raw, names) if result.raw is not None else None))
        else:
            predictions.append(DetectionResult(height=height, width=width, detections=detections(result.calibrated, names),
                                               raw_detections=detections(result.raw, names) if result.raw is not None else None))
    return DensePredictResponse(model_name=runtime.settings.model_name, calibration_version=state.version, task=runtime.task,
                                predictions=predictions)
