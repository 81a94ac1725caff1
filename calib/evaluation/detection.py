"""Detection evaluation: the detector runs with the calibrated classification head inside its normal
post-processing, and COCO-style AP comes from pycocotools (never a hand-written AP).

    detector = load_detector(None, "det.pt", card="det.json")
    results = detect(detector, coco, root, {"disalign": calibrator})  # disalign.feature_extract.detection: COCO results per head
    scores = detection_ap(coco, results["disalign"], iou_type="bbox")  # AP, AP50, AP75, APs/m/l, AP_r/c/f

:class:`CalibratedBoxPredictor` wraps the detector's ``box_predictor``: the box head's representation x
(R, d) and the K+1 class scores z go through the calibration (DisAlign leaves the background logit
untouched), and torchvision's own post-processing follows — softmax over K+1, score threshold
(1e-4), per-class NMS (0.5) and the top :data:`DETECTIONS_PER_IMAGE` (300, as for LVIS) — as do its
mask head and the resizing back to the image.

Two protocols, chosen from the annotations (:func:`is_lvis`):

- COCO (pycocotools ``COCOeval``): AP_r / AP_c / AP_f are COCO AP over the categories of each
  ``frequency`` group, computed by COCOeval restricted to them.
- LVIS (the ``lvis`` package's ``LVISEval``), when the images carry LVIS's federated lists
  ``neg_category_ids`` and ``not_exhaustive_category_ids``: a detection of a category that is neither
  annotated in the image nor verified absent (negative) is not scored, and an unmatched detection of a
  category whose annotation is not exhaustive in the image is ignored — COCOeval would count both as
  false positives. AP_r / AP_c / AP_f are LVISEval's APr / APc / APf.

pycocotools and lvis are imported only when AP is computed (``pip install pycocotools lvis``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from disalign.calib.errors import InputError
from disalign.calib.estimators.base import Calibrator

SCORE_THRESHOLD = 1e-4
NMS_THRESHOLD = 0.5
DETECTIONS_PER_IMAGE = 300
FREQUENCY_GROUPS = ("r", "c", "f")


class CalibratedBoxPredictor(nn.Module):
    """``box_predictor`` replacement: (x (R, d)) → (calibrated class logits (R, K+1), box deltas (R, 4(K+1)))."""

    def __init__(self, predictor: nn.Module, calibrator: Calibrator | None):
        super().__init__()
        self.predictor = predictor
        self.calibrator = calibrator

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, deltas = self.predictor(x)
        if self.calibrator is None or logits.shape[0] == 0:
            return logits, deltas
        calibrated = self.calibrator.predict_logits(x.flatten(1).float().cpu(), logits.float().cpu())
        return calibrated.to(logits.device, logits.dtype), deltas


@contextlib.contextmanager
def calibrated_head(module: nn.Module, calibrator: Calibrator | None, *, score_threshold: float = SCORE_THRESHOLD,
                    nms_threshold: float = NMS_THRESHOLD, detections_per_image: int = DETECTIONS_PER_IMAGE):
    """Temporarily put ``calibrator`` (None: the stage-1 head) and the evaluation post-processing into ``module``."""
    heads = module.roi_heads
    saved = (heads.box_predictor, heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
    heads.box_predictor = CalibratedBoxPredictor(saved[0], calibrator)
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = score_threshold, nms_threshold, detections_per_image
    try:
        yield module
    finally:
        heads.box_predictor, heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved


def encode_mask(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE ``{"size": [H, W], "counts": [...]}`` of a binary (H, W) mask (column-major runs, zeros first)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def detections_to_coco(image_id: int, output: dict[str, torch.Tensor], category_ids: list[int]) -> list[dict]:
    """torchvision outputs of one image (boxes x1 y1 x2 y2, labels 1..K, scores, masks (n, 1, H, W)) → COCO results."""
    boxes = output["boxes"].detach().cpu().double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    results = []
    masks = output.get("masks")
    for i, (box, label, score) in enumerate(zip(xywh, output["labels"].tolist(), output["scores"].tolist(), strict=True)):
        result = {"image_id": int(image_id), "category_id": int(category_ids[label - 1]), "bbox": [round(v, 2) for v in box],
                  "score": float(score)}
        if masks is not None:
            result["segmentation"] = encode_mask(masks[i, 0].cpu().numpy() >= 0.5)
        results.append(result)
    return results


def run_heads(module: nn.Module, images: list[torch.Tensor], heads: dict[str, Calibrator | None], *,
              score_threshold: float = SCORE_THRESHOLD, nms_threshold: float = NMS_THRESHOLD,
              detections_per_image: int = DETECTIONS_PER_IMAGE) -> dict[str, list[dict[str, torch.Tensor]]]:
    """torchvision detections of ``images`` ((3, H, W) floats in [0, 1]) for each named head (None: stage 1).

    The steps of ``GeneralizedRCNN.forward`` in eval mode, with the backbone and the RPN run once and the
    RoI heads (box head, calibrated predictor, post-processing, mask head) and the resizing back run per head.
    """
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    with torch.inference_mode():
        batch, _ = module.transform(images)
        features = module.backbone(batch.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = module.rpn(batch, features)
        out = {}
        for name, calibrator in heads.items():
            with calibrated_head(module, calibrator, score_threshold=score_threshold, nms_threshold=nms_threshold,
                                 detections_per_image=detections_per_image):
                detections, _ = module.roi_heads(features, proposals, batch.image_sizes)
            out[name] = module.transform.postprocess(detections, batch.image_sizes, original_sizes)
    return out


def check_detector_calibration(detector, calibrator: Calibrator) -> None:
    """Raise unless ``calibrator`` was fitted on this detector's RoI bank (K+1, d, fingerprint, background 0)."""
    calibrator.check_compatible(num_classes=detector.num_classes, feature_dim=detector.feature_dim,
                                model_fingerprint=detector.fingerprint, source="detector")
    if calibrator.meta_.background_index not in (None, 0):
        raise InputError(f"the calibration has background_index {calibrator.meta_.background_index}; torchvision detectors use 0.")


def _coco_api(coco: dict):
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise InputError("AP needs pycocotools; install it with pip install pycocotools.") from exc
    gt = COCO()
    gt.dataset = {k: coco[k] for k in ("images", "annotations", "categories")}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, COCOeval


def coco_ap(coco: dict, results: list[dict], *, iou_type: str = "bbox", max_detections: int = DETECTIONS_PER_IMAGE) -> dict:
    """AP, AP50, AP75, APs, APm, APl over all categories and AP_r / AP_c / AP_f over each frequency group
    (fractions in [0, 1]; None where nothing can be scored). One pycocotools COCOeval run.

    Every number is read off COCOeval's accumulated precision table (T, R, K, A, M) the way its
    ``summarize`` does — the mean of the entries > -1 — at ``max_detections``: ``summarize`` hard-codes
    100 detections for its first number, and LVIS-style evaluation keeps 300. A group's AP is the same
    mean over its categories' columns, which is what COCOeval gives with ``params.catIds`` set to them.
    """
    if iou_type not in ("bbox", "segm"):
        raise InputError(f"iou_type should be 'bbox' or 'segm', found {iou_type!r}.")
    gt, COCOeval = _coco_api(coco)
    if iou_type == "segm":
        gt.dataset["annotations"] = [a for a in gt.dataset["annotations"] if "segmentation" in a]
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", *(f"AP_{g}" for g in FREQUENCY_GROUPS))
    if not results:
        return dict.fromkeys(names)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
    p = evaluator.params
    precision = evaluator.eval["precision"][..., -1]  # (T, R, K, A) at max_detections

    def mean(values: np.ndarray) -> float | None:
        kept = values[values > -1]
        return float(kept.mean()) if kept.size else None

    area = {label: i for i, label in enumerate(p.areaRngLbl)}
    t50, t75 = (int(np.argmin(np.abs(p.iouThrs - t))) for t in (0.5, 0.75))
    scores = {"AP": mean(precision[..., area["all"]]), "AP50": mean(precision[t50, ..., area["all"]]),
              "AP75": mean(precision[t75, ..., area["all"]]), "APs": mean(precision[..., area["small"]]),
              "APm": mean(precision[..., area["medium"]]), "APl": mean(precision[..., area["large"]])}
    for group in FREQUENCY_GROUPS:
        columns = [p.catIds.index(c["id"]) for c in coco["categories"] if c.get("frequency") == group]
        scores[f"AP_{group}"] = mean(precision[:, :, columns, area["all"]]) if columns else None
    return scores


LVIS_LISTS = ("neg_category_ids", "not_exhaustive_category_ids")


def is_lvis(coco: dict) -> bool:
    """True for LVIS-format annotations: images carrying the federated lists (``neg_category_ids`` …)."""
    return any(key in image for image in coco["images"] for key in LVIS_LISTS)


def check_lvis(coco: dict) -> None:
    """Raise :class:`InputError` unless the LVIS fields that LVISEval reads are all there."""
    for image in coco["images"]:
        for key in LVIS_LISTS:
            if not isinstance(image.get(key), list):
                raise InputError(f"LVIS annotations: image {image.get('id')} should have a list '{key}', found {image.get(key)!r}.")
    for category in coco["categories"]:
        if category.get("frequency") not in FREQUENCY_GROUPS:
            raise InputError(f"LVIS annotations: category {category.get('id')} should have a frequency r, c or f, "
                             f"found {category.get('frequency')!r}.")
    for ann in coco["annotations"]:
        if not isinstance(ann.get("area"), int | float):
            raise InputError(f"LVIS annotations: annotation {ann.get('id')} should have a numeric 'area', found {ann.get('area')!r}.")


@contextlib.contextmanager
def _lvis_compatible():
    """Run lvis 0.5.3, its latest release: it uses ``np.float`` (removed in NumPy 1.24; fixed on the lvis-api
    master branch but never released), calls the deprecated ``Logger.warn`` and logs progress at INFO/WARN."""
    logger = logging.getLogger("lvis")
    level, alias = logger.level, not hasattr(np, "float")
    if alias:
        np.float = float  # type: ignore[attr-defined]
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)
        if alias:
            del np.float


def lvis_ap(coco: dict, results: list[dict], *, iou_type: str = "bbox", max_detections: int = DETECTIONS_PER_IMAGE) -> dict:
    """The same scores as :func:`coco_ap` (fractions in [0, 1], None where nothing can be scored) from the
    ``lvis`` package's ``LVISEval`` (federated LVIS protocol; module docstring), ``max_detections`` per image."""
    if iou_type not in ("bbox", "segm"):
        raise InputError(f"iou_type should be 'bbox' or 'segm', found {iou_type!r}.")
    check_lvis(coco)
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", *(f"AP_{g}" for g in FREQUENCY_GROUPS))
    if not results:
        return dict.fromkeys(names)
    try:
        with _lvis_compatible():
            from lvis import LVIS, LVISEval, LVISResults
    except ImportError as exc:
        raise InputError(f"LVIS annotations need the lvis package for AP, which did not import ({exc}); "
                         "install it with pip install lvis (it imports opencv-python).") from exc

    class InMemoryLVIS(LVIS):
        def _load_json(self, annotations):  # the annotations are already parsed
            return annotations

    annotations = coco["annotations"]
    if iou_type == "segm":
        annotations = [a for a in annotations if "segmentation" in a]
    # LVISEval writes into the annotations (ignore flags, RLE masks): give it copies
    dataset = {"images": coco["images"], "categories": coco["categories"], "annotations": [dict(a) for a in annotations]}
    with _lvis_compatible():
        gt = InMemoryLVIS(dataset)
        evaluator = LVISEval(gt, LVISResults(gt, [dict(r) for r in results], max_dets=max_detections), iou_type)
        evaluator.params.max_dets = max_detections
        evaluator.run()
    keys = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "APs": "APs", "APm": "APm", "APl": "APl",
            "AP_r": "APr", "AP_c": "APc", "AP_f": "APf"}
    return {ours: (None if evaluator.results[theirs] == -1 else float(evaluator.results[theirs])) for ours, theirs in keys.items()}


def detection_ap(coco: dict, results: list[dict], *, iou_type: str = "bbox", max_detections: int = DETECTIONS_PER_IMAGE) -> dict:
    """AP by the protocol of the annotations: :func:`lvis_ap` for LVIS-format files, else :func:`coco_ap`."""
    evaluate = lvis_ap if is_lvis(coco) else coco_ap
    return evaluate(coco, results, iou_type=iou_type, max_detections=max_detections)


COLUMNS = ("AP", "AP50", "AP75", "AP_r", "AP_c", "AP_f")


def format_detection_table(report: dict) -> str:
    """A text table: a row per method and IoU type, COCO AP columns in percent ("-" for None)."""
    header = ["method", "type", *COLUMNS]
    rows = [[name, iou_type, *("-" if s.get(c) is None else f"{100 * s[c]:.1f}" for c in COLUMNS)]
            for name, by_type in report["methods"].items() for iou_type, s in by_type.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), *(c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True))])  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
