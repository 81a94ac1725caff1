"""RoI banks: COCO / LVIS annotated images + a frozen two-stage detector → one bank row per sampled RoI.

    disalign extract --task detection --model disalign.feature_extract.detectors:compact_faster_rcnn --weights det.pt \\
        --card det.json --root DIR --annotations train.json --out train.h5 [--rois-per-image 512] [--fg-fraction 0.25]

The detector (torchvision's Faster / Mask R-CNN, or any builder of :mod:`disalign.feature_extract.detectors`) is
rebuilt from the card's ``model`` / ``model_kwargs`` (``--model`` overrides the card's ``model``) and a
state_dict loaded with ``weights_only=True``. A row is one RoI: ``features`` = the box head's
representation (the input of ``box_predictor``), ``logits`` = the K+1 class scores with background at
index 0 (torchvision's convention), ``labels`` = its training target. Per image, the RPN's proposals plus
the ground-truth boxes are matched to the ground truth by torchvision's own matcher (IoU ≥ 0.5 → the
box's class, otherwise background) and sampled as in Fast R-CNN by its balanced sampler:
``--rois-per-image`` RoIs, at most ``--fg-fraction`` of them foreground (seeded).

Extra columns: ``image_id`` (the COCO image id, int64) and ``box`` (the RoI, x1 y1 x2 y2 in image pixels,
float32). Category ``c`` of the sorted category ids is class ``c + 1``. ``class_counts`` are the training
instance counts per category (background entry 0: GRW gives it weight 1 whatever it is), counted from
``--annotations`` or copied from ``--class-counts-from`` (a bank or a COCO JSON).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from disalign.calib.data.annotations import read_coco, sorted_categories
from disalign.calib.data.bank import FEATURE_DTYPES, BankReader, BankWriter
from disalign.calib.estimators.base import Calibrator
from disalign.calib.evaluation.detection import (
    DETECTIONS_PER_IMAGE,
    SCORE_THRESHOLD,
    check_detector_calibration,
    detections_to_coco,
    run_heads,
)
from disalign.calib.files import check_output_file, file_fingerprint
from disalign.calib.progress import progress_bar
from disalign.feature_extract.detectors import build_detector
from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.models import _apply_weights, _load_state_dict
from disalign.feature_extract.preprocess import decode_image

logger = logging.getLogger("feature_extract")
BACKGROUND = "__background__"


# -- annotations (read by disalign.calib.data.annotations) -----------------------------------------
def instance_counts(coco: dict) -> np.ndarray:
    """(K+1,) int64: background 0, then the number of (non-crowd) instances of each category in id order."""
    index = {c["id"]: i + 1 for i, c in enumerate(sorted_categories(coco))}
    counts = np.zeros(len(index) + 1, dtype=np.int64)
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            counts[index[ann["category_id"]]] += 1
    return counts


def targets_of(coco: dict) -> dict[int, dict[str, torch.Tensor]]:
    """Per image id: ``boxes`` (G, 4) float32 x1 y1 x2 y2 and ``labels`` (G,) int64 in 1..K (crowd boxes left out)."""
    index = {c["id"]: i + 1 for i, c in enumerate(sorted_categories(coco))}
    boxes: dict[int, list] = {img["id"]: [] for img in coco["images"]}
    labels: dict[int, list] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        if ann.get("iscrowd", 0) or w <= 0 or h <= 0:
            continue
        boxes[ann["image_id"]].append([x, y, x + w, y + h])
        labels[ann["image_id"]].append(index[ann["category_id"]])
    return {i: {"boxes": torch.tensor(boxes[i], dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels[i], dtype=torch.int64)}
            for i in boxes}


def load_image(root: Path, image: dict) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: the detectors normalise and resize themselves."""
    img = decode_image(Path(root) / image["file_name"])
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255.0)


# -- the model ------------------------------------------------------------------------------------
@dataclass
class Detector:
    """A frozen two-stage detector with its K+1-way box classifier (background = index 0)."""

    module: nn.Module  # torchvision GeneralizedRCNN
    fingerprint: str
    feature_dim: int
    num_classes: int  # K + 1
    classifier_weight: torch.Tensor  # (K+1, d)
    classifier_bias: torch.Tensor | None
    categories: list[dict]  # sorted by id: class c + 1 is categories[c]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    kind: str = "detector"

    @property
    def class_names(self) -> list[str]:
        return [BACKGROUND, *(str(c.get("name", c["id"])) for c in self.categories)]

    @property
    def has_masks(self) -> bool:
        return bool(getattr(self.module.roi_heads, "has_mask", lambda: False)())


def read_card(path: str | Path | None) -> dict:
    if path is None:
        return {}
    try:
        card = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExtractError(f"model card {path} is not readable JSON ({exc}).") from exc
    if not isinstance(card, dict):
        raise ExtractError(f"model card {path} should be a JSON object.")
    return card


def load_detector(spec: str | None, weights: str | Path, *, card: str | Path | None = None, categories: list[dict] | None = None,
                  device: str = "cpu") -> Detector:
    """Rebuild the detector of ``card`` (``spec`` overrides its ``model``), load ``weights`` strictly, freeze it."""
    info = read_card(card)
    spec = spec or info.get("model")
    if not spec:
        raise ExtractError("the detector is unknown: pass --model or a card with a 'model' field.")
    if weights is None:
        raise ExtractError(f"--model {spec} needs --weights (a state_dict of the trained detector).")
    state = _load_state_dict(weights)
    kwargs = dict(info.get("model_kwargs") or {})
    cls_key = "roi_heads.box_predictor.cls_score.weight"
    if cls_key not in state:
        raise ExtractError(f"--weights {weights} has no '{cls_key}': it is not the state_dict of a two-stage detector.")
    kwargs.setdefault("num_classes", int(state[cls_key].shape[0]))
    module = build_detector(spec, kwargs)
    _apply_weights(module, state, weights)
    module.eval().requires_grad_(False).to(device)
    cats = sorted(categories or info.get("categories") or [], key=lambda c: c["id"])
    k1 = int(state[cls_key].shape[0])
    if not cats:
        cats = [{"id": i, "name": str(i)} for i in range(1, k1)]
    if len(cats) + 1 != k1:
        raise ExtractError(f"the detector has {k1} classes (background included) but the categories list {len(cats)} (+1 background).")
    predictor = module.roi_heads.box_predictor.cls_score
    bias = predictor.bias.detach().float().cpu().clone() if predictor.bias is not None else None
    return Detector(module, file_fingerprint(weights), int(predictor.in_features), k1, predictor.weight.detach().float().cpu().clone(),
                    bias, cats, torch.device(device))


# -- RoI sampling ---------------------------------------------------------------------------------
def sample_rois(detector: Detector, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], *,
                rois_per_image: int, fg_fraction: float) -> list[dict[str, torch.Tensor]]:
    """Per image: ``features`` (R, d), ``logits`` (R, K+1), ``labels`` (R,) and ``boxes`` (R, 4) in image pixels.

    images: (3, H, W) float in [0, 1]; targets: ``boxes`` (G, 4) x1 y1 x2 y2 and ``labels`` (G,) in 1..K.
    Uses the global torch RNG (the balanced sampler does): seed it for reproducible rows.
    """
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

    m, dev = detector.module, detector.device
    sizes = [tuple(img.shape[-2:]) for img in images]
    with torch.inference_mode():
        batch, resized = m.transform([img.to(dev) for img in images], [{k: v.to(dev) for k, v in t.items()} for t in targets])
        features = m.backbone(batch.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = m.rpn(batch, features)
        heads = m.roi_heads
        gt_boxes = [t["boxes"] for t in resized]
        proposals = heads.add_gt_proposals(proposals, gt_boxes)
        _, labels = heads.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in resized])
        positive, negative = BalancedPositiveNegativeSampler(rois_per_image, fg_fraction)(labels)
        keep = [torch.where(p | n)[0] for p, n in zip(positive, negative, strict=True)]
        proposals = [p[k] for p, k in zip(proposals, keep, strict=True)]
        labels = [lab[k] for lab, k in zip(labels, keep, strict=True)]
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))  # (R, d)
        logits, _ = heads.box_predictor(box_features)  # (R, K+1)
    out, start = [], 0
    for props, labs, (h, w), (rh, rw) in zip(proposals, labels, sizes, batch.image_sizes, strict=True):
        n = props.shape[0]
        scale = torch.tensor([w / rw, h / rh, w / rw, h / rh], device=props.device)
        out.append({"features": box_features[start:start + n].float().cpu(), "logits": logits[start:start + n].float().cpu(),
                    "labels": labs.cpu(), "boxes": (props * scale).float().cpu()})
        start += n
    return out


# -- the job --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectionExtractConfig:
    """Arguments of one RoI-bank extraction (the CLI builds this)."""

    model: str | None
    weights: Path
    root: Path
    annotations: Path
    out: Path
    card: Path | None = None
    rois_per_image: int = 512
    fg_fraction: float = 0.25
    class_counts_from: Path | None = None
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    feature_dtype: str = "float16"
    overwrite: bool = False
    progress: bool = False  # a bar per batch of images on a terminal's stderr

    def __post_init__(self):
        if self.rois_per_image < 1:
            raise ExtractError(f"--rois-per-image should be >= 1, found {self.rois_per_image}.")
        if not 0 < self.fg_fraction <= 1:
            raise ExtractError(f"--fg-fraction should be in (0, 1], found {self.fg_fraction}.")
        if self.batch_size < 1:
            raise ExtractError(f"--batch-size should be >= 1, found {self.batch_size}.")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ExtractError(f"--feature-dtype should be one of {', '.join(FEATURE_DTYPES)}, found {self.feature_dtype!r}.")


def _counts(cfg: DetectionExtractConfig, coco: dict, k1: int) -> tuple[np.ndarray, str]:
    source = cfg.class_counts_from
    if source is None:
        return instance_counts(coco), f"instances of {cfg.annotations}"
    if Path(source).suffix == ".json":
        counts = instance_counts(read_coco(source))
    else:
        with BankReader(source) as reader:
            counts = reader.info.class_counts
    if counts is None or counts.shape[0] != k1:
        raise ExtractError(f"--class-counts-from {source} has no class counts for the detector's {k1} classes (background included).")
    return counts, str(source)


def extract_detection_bank(cfg: DetectionExtractConfig) -> Path:
    """Write the RoI bank of ``cfg.annotations``' images; returns its path."""
    check_output_file(cfg.out, "--out", overwrite=cfg.overwrite)  # a new name, or a regular file with --overwrite
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError("--device cuda was requested but torch.cuda.is_available() is False.")
    coco = read_coco(cfg.annotations)
    detector = load_detector(cfg.model, cfg.weights, card=cfg.card, categories=sorted_categories(coco), device=cfg.device)
    counts, counts_source = _counts(cfg, coco, detector.num_classes)
    targets = targets_of(coco)
    settings = {"task": "detection", "rois_per_image": cfg.rois_per_image, "fg_fraction": cfg.fg_fraction, "fg_iou": 0.5,
                "proposals": "rpn (test-time top-n) + ground truth", "seed": cfg.seed, "images": len(coco["images"]),
                "category_ids": [c["id"] for c in detector.categories]}
    writer = BankWriter(cfg.out, feature_dim=detector.feature_dim, class_names=detector.class_names, feature_dtype=cfg.feature_dtype,
                        class_counts=counts, model_fingerprint=detector.fingerprint, preprocessing=settings, task="detection",
                        background_index=0, classifier_weight=detector.classifier_weight, classifier_bias=detector.classifier_bias,
                        extra_columns={"image_id": ((), "int64"), "box": ((4,), "float32")}, overwrite=cfg.overwrite)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            images = coco["images"]
            for start in progress_bar(range(0, len(images), cfg.batch_size), enabled=cfg.progress, desc="extracting", unit="batch"):
                batch = images[start:start + cfg.batch_size]
                rows = sample_rois(detector, [load_image(cfg.root, img) for img in batch], [targets[img["id"]] for img in batch],
                                   rois_per_image=cfg.rois_per_image, fg_fraction=cfg.fg_fraction)
                for offset, (img, r) in enumerate(zip(batch, rows, strict=True)):
                    n = r["labels"].numel()
                    if not (torch.isfinite(r["features"]).all() and torch.isfinite(r["logits"]).all()):
                        raise ExtractError(f"the detector gave non-finite RoI features or logits for image {img['id']}.")
                    writer.append(features=r["features"], logits=r["logits"], labels=r["labels"],
                                  sample_index=np.full(n, start + offset, np.int64), view=np.zeros(n, np.int16),
                                  image_id=np.full(n, img["id"], np.int64), box=r["boxes"])
        return writer.finish({"class_counts_source": counts_source, "source": str(cfg.annotations), "model_spec": cfg.model or ""})
    except BaseException:
        writer.abort()
        raise


# -- evaluation: the detector over the test images, one result list per calibrated head ---------------
def detect(detector, coco: dict, root: str | Path, heads: dict[str, Calibrator | None], *, batch_size: int = 8,
           score_threshold: float = SCORE_THRESHOLD, detections_per_image: int = DETECTIONS_PER_IMAGE,
           progress: bool = False) -> dict[str, list[dict]]:
    """COCO result dicts for every image of ``coco``, per named head (a calibrator, or None for the stage-1 head):
    the backbone and RPN run once per image, the RoI heads once per method; ``progress``: a bar on a terminal's stderr.
    The AP of the results is :func:`disalign.calib.evaluation.detection.detection_ap`."""
    for calibrator in heads.values():
        if calibrator is not None:
            check_detector_calibration(detector, calibrator)
    category_ids = [c["id"] for c in detector.categories]
    results: dict[str, list[dict]] = {name: [] for name in heads}
    images = coco["images"]
    with progress_bar(total=len(images), enabled=progress, desc="detecting", unit="image") as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            outputs = run_heads(detector.module, [load_image(Path(root), img).to(detector.device) for img in batch], heads,
                                score_threshold=score_threshold, detections_per_image=detections_per_image)
            for name, per_image in outputs.items():
                for img, out in zip(batch, per_image, strict=True):
                    results[name].extend(detections_to_coco(img["id"], out, category_ids))
            bar.update(len(batch))
    return results
