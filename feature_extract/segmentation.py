"""Pixel banks: image/mask pairs + a frozen segmentation model → one bank row per feature-map pixel.

    disalign extract --task segmentation --model fcn.ts --card fcn.json --root DIR --list train.txt \\
        --out train.h5 [--pixels-per-image 64] [--balanced] [--class-stats objectInfo150.txt]

Models (:func:`load_segmentation_model`):

- a TorchScript file with ``forward_features(x)`` → (N, d, h, w) and a 1x1 conv ``classifier``
  (logits = classifier(features));
- ``torchvision:<arch>`` for torchvision's FCN / DeepLabv3 + ``--weights`` (a state_dict): the features are
  the input of the last conv of ``model.classifier`` (a 1x1 conv), the logits its output — both before
  the model's bilinear upsampling.

The list holds ``image mask`` pairs relative to ``--root`` (ADE20K convention: PNG masks of class ids,
255 = ignore). Each image is resized straight to the card's input size; a feature-map pixel (y, x) of an
(h, w) map takes the mask label at the centre of its cell in the full-resolution mask (255 → label -1).

Rows (see ``docs/dense-banks.md``): ``sample_index`` = list row (the image id), extra column ``yx`` (int16,
(2,)) = the pixel's position in the feature map. ``--pixels-per-image N`` samples N labelled pixels per
image (uniformly, or with ``--balanced`` uniformly over the classes present, then over their pixels);
without it every pixel is kept (ignored ones with label -1): the dense layout that evaluation needs.
``class_counts`` are full-resolution training pixel counts: of this list's masks, of ``--class-counts-from``
(a bank), or of an ADE20K ``objectInfo150``-style table (``--class-stats``, the ``Ratio`` column as the
official code uses it, scaled by :data:`RATIO_SCALE` to integers). The geometry that evaluation needs is
kept in the ``preprocessing`` attribute (``input_size``, ``feature_map``, ``upsample``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from disalign.calib.data.annotations import read_mask, read_pairs
from disalign.calib.data.bank import FEATURE_DTYPES, BankReader, BankWriter
from disalign.calib.defaults import IGNORE_INDEX
from disalign.calib.files import check_output_file, file_fingerprint
from disalign.calib.progress import progress_bar
from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.models import TORCHVISION_PREFIX
from disalign.feature_extract.preprocess import Preprocessing, decode_image, normalize

logger = logging.getLogger("feature_extract")
RATIO_SCALE = 10**9  # class-stats ratios become integer "pixel counts" ratio × 1e9 (GRW only uses their ratios)
UPSAMPLE = {"mode": "bilinear", "align_corners": False}


# -- models ---------------------------------------------------------------------------------------
@dataclass
class SegmentationModel:
    """A frozen segmentation model; ``features_and_logits`` gives feature-resolution maps."""

    module: nn.Module
    kind: str  # "torchscript" | "torchvision"
    fingerprint: str
    feature_dim: int
    num_classes: int
    classifier_weight: torch.Tensor  # (K, d) float32: the 1x1 conv
    classifier_bias: torch.Tensor | None  # (K,)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _captured: dict = field(default_factory=dict, repr=False)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) normalised → features (N, d, h, w) float32, logits (N, K, h, w) float32."""
        with torch.inference_mode():
            if self.kind == "torchscript":
                features = self.module.forward_features(images)
                logits = self.module.classifier(features)
            else:
                self._captured.clear()
                self.module(images)
                features, logits = self._captured.pop("features"), self._captured.pop("logits")
        return features.float(), logits.float()


def _conv_weights(conv: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = getattr(conv, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.ndim == 4 and tuple(weight.shape[2:]) == (1, 1)):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise ExtractError(f"{where} should be a 1x1 conv with a weight of shape (K, d, 1, 1), found {shape}.")
    bias = getattr(conv, "bias", None)
    return weight.detach().float().cpu().reshape(weight.shape[0], weight.shape[1]).clone(), (
        bias.detach().float().cpu().clone() if isinstance(bias, torch.Tensor) else None)


def load_segmentation_model(spec: str, weights: str | Path | None = None, *, device: str = "cpu") -> SegmentationModel:
    """Load a TorchScript file or ``torchvision:<arch>`` (+ weights) segmentation model, frozen on ``device``."""
    dev = torch.device(device)
    if spec.startswith(TORCHVISION_PREFIX):
        return _load_torchvision(spec[len(TORCHVISION_PREFIX):], weights, dev)
    path = Path(spec)
    if not path.is_file():
        raise ExtractError(f"--model should be a TorchScript file or torchvision:<arch>, found {spec!r} (no such file).")
    if weights is not None:
        raise ExtractError(f"--weights is only for torchvision:<arch> models, but --model {spec} is a file.")
    try:
        with warnings.catch_warnings():  # torch >= 2.14 deprecates TorchScript; the format is still what we load
            warnings.filterwarnings("ignore", message="`torch.jit")
            module = torch.jit.load(str(path), map_location=dev).eval()
    except Exception as exc:  # noqa: BLE001 - jit raises RuntimeError/ValueError variants
        raise ExtractError(f"--model {path} is not a TorchScript file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}).") from exc
    if not hasattr(module, "forward_features") or not hasattr(module, "classifier"):
        raise ExtractError(f"the segmentation model {path} should expose forward_features(x) and a 1x1 conv 'classifier'.")
    weight, bias = _conv_weights(module.classifier, f"'classifier' of {path}")
    return SegmentationModel(module, "torchscript", file_fingerprint(path), int(weight.shape[1]), int(weight.shape[0]),
                             weight, bias, dev)


def _load_torchvision(arch: str, weights: str | Path | None, dev: torch.device) -> SegmentationModel:
    try:
        from torchvision.models import segmentation
    except ImportError as exc:
        raise ExtractError(f"--model torchvision:{arch} needs the optional dependency torchvision; install it with pip install 'disalign[torchvision]'.") from exc
    from disalign.feature_extract.models import _apply_weights, _load_state_dict

    choices = sorted(n for n in dir(segmentation) if n.startswith(("fcn_", "deeplabv3_")) and callable(getattr(segmentation, n)))
    if arch not in choices:
        raise ExtractError(f"--model torchvision:{arch} is not a supported segmentation model; choose one of {', '.join(choices)}.")
    if weights is None:
        raise ExtractError(f"--model torchvision:{arch} needs --weights (a state_dict); pretrained downloads are not used.")
    state = _load_state_dict(weights)
    num_classes = int(state["classifier.4.weight"].shape[0]) if "classifier.4.weight" in state else 21
    aux = any(name.startswith("aux_classifier.") for name in state)
    module = getattr(segmentation, arch)(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux)
    _apply_weights(module, state, weights)
    module.eval().requires_grad_(False).to(dev)
    conv = module.classifier[-1]
    weight, bias = _conv_weights(conv, f"the last layer of {arch}.classifier")
    model = SegmentationModel(module, "torchvision", file_fingerprint(weights), int(weight.shape[1]), int(weight.shape[0]),
                              weight, bias, dev)
    captured = model._captured
    conv.register_forward_hook(lambda _m, args, out: captured.update(features=args[0], logits=out))
    return model


# -- lists, labels, counts ------------------------------------------------------------------------
def cell_labels(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w) labels of a feature map: the mask value at each cell's centre (IGNORE_INDEX → -1)."""
    height, width = mask.shape
    ys = np.minimum(((np.arange(h) + 0.5) * height / h).astype(np.int64), height - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * width / w).astype(np.int64), width - 1)
    labels = mask[np.ix_(ys, xs)]
    return np.where(labels == IGNORE_INDEX, -1, labels)


def sample_pixels(labels: np.ndarray, count: int | None, *, balanced: bool, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat indices of the pixels kept from labels (h·w,): all (count None), else ``count`` labelled
    pixels drawn without replacement, uniformly or (balanced) a class uniformly then one of its pixels."""
    if count is None:
        return np.arange(labels.size)
    labelled = np.flatnonzero(labels >= 0)
    if labelled.size <= count:
        return labelled
    if not balanced:
        return np.sort(rng.choice(labelled, size=count, replace=False))
    by_class = {c: list(rng.permutation(labelled[labels[labelled] == c])) for c in np.unique(labels[labelled])}
    chosen: list[int] = []
    while len(chosen) < count:
        c = list(by_class)[int(rng.integers(len(by_class)))]
        chosen.append(int(by_class[c].pop()))
        if not by_class[c]:
            del by_class[c]
    return np.sort(np.asarray(chosen, dtype=np.int64))


def read_class_stats(path: str | Path, num_classes: int) -> np.ndarray:
    """(K,) int64 counts ∝ the ``Ratio`` column of an ADE20K objectInfo150-style table (tab-separated,
    header ``Idx Ratio Train Val Name``; Idx 1-based as ADE20K's or 0-based as cifar_mosaic's)."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ExtractError(f"--class-stats {path} is not a readable text file ({exc}).") from exc
    header = lines[0].split("\t") if lines else []
    if "Ratio" not in header or "Idx" not in header:
        raise ExtractError(f"--class-stats {path}: the header should name the columns Idx and Ratio (objectInfo150 layout), found {header}.")
    idx_col, ratio_col = header.index("Idx"), header.index("Ratio")
    rows = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            rows[int(fields[idx_col])] = float(fields[ratio_col])
        except (IndexError, ValueError):
            raise ExtractError(f"--class-stats {path} line {number}: expected an integer Idx and a number Ratio, found {line!r:.80}.") from None
    first = min(rows) if rows else 0
    if sorted(rows) != list(range(first, first + num_classes)) or first not in (0, 1):
        raise ExtractError(f"--class-stats {path} should list Idx 0..{num_classes - 1} (or 1..{num_classes}) for the model's K={num_classes} classes, found {len(rows)} rows.")
    ratios = np.array([rows[first + c] for c in range(num_classes)])
    if (ratios < 0).any() or ratios.sum() <= 0:
        raise ExtractError(f"--class-stats {path}: the Ratio column should be non-negative with a positive sum.")
    return np.round(ratios * RATIO_SCALE).astype(np.int64)


# -- the job --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentationExtractConfig:
    """Arguments of one pixel-bank extraction (the CLI builds this)."""

    model: str
    root: Path
    list_file: Path
    out: Path
    weights: Path | None = None
    card: Path | None = None
    prep: Preprocessing | None = None  # None: from the card (resize must be unset), else 512x512 ImageNet
    pixels_per_image: int | None = None  # None: every pixel (the dense layout evaluation needs)
    balanced: bool = False
    class_stats: Path | None = None
    class_counts_from: Path | None = None
    seed: int = 0
    batch_size: int = 32
    device: str = "cpu"
    feature_dtype: str = "float16"
    overwrite: bool = False
    progress: bool = False  # a bar per batch of images on a terminal's stderr

    def __post_init__(self):
        if self.pixels_per_image is not None and self.pixels_per_image < 1:
            raise ExtractError(f"--pixels-per-image should be >= 1, found {self.pixels_per_image}.")
        if self.class_stats is not None and self.class_counts_from is not None:
            raise ExtractError("give at most one of --class-stats and --class-counts-from.")
        if self.batch_size < 1:
            raise ExtractError(f"--batch-size should be >= 1, found {self.batch_size}.")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ExtractError(f"--feature-dtype should be one of {', '.join(FEATURE_DTYPES)}, found {self.feature_dtype!r}.")


def _preprocessing(cfg: SegmentationExtractConfig) -> Preprocessing:
    prep = cfg.prep or (Preprocessing.from_card(cfg.card) if cfg.card else None)
    if prep is None:
        raise ExtractError("--task segmentation needs --card (input.size, mean, std) or --crop/--mean/--std.")
    if prep.resize is not None:
        raise ExtractError(f"segmentation inputs are resized straight to input.size; the card's input.resize ({prep.resize}) should be unset.")
    return prep


def _class_names(card: Path | None, k: int) -> list[str]:
    import json

    names = json.loads(Path(card).read_text()).get("classes") if card else None
    return [str(c) for c in names] if isinstance(names, list) and len(names) == k else [str(i) for i in range(k)]


def extract_segmentation_bank(cfg: SegmentationExtractConfig) -> Path:
    """Write the pixel bank of ``cfg.list_file``; returns its path."""
    check_output_file(cfg.out, "--out", overwrite=cfg.overwrite)  # a new name, or a regular file with --overwrite
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError("--device cuda was requested but torch.cuda.is_available() is False.")
    prep = _preprocessing(cfg)
    pairs = read_pairs(cfg.list_file)
    model = load_segmentation_model(cfg.model, cfg.weights, device=cfg.device)
    k, d = model.num_classes, model.feature_dim
    masks = [read_mask(cfg.root / m, k) for _, m in pairs]  # validated before any forward pass
    if cfg.class_stats is not None:
        counts, counts_source = read_class_stats(cfg.class_stats, k), f"{cfg.class_stats} (Ratio x {RATIO_SCALE:g})"
    elif cfg.class_counts_from is not None:
        with BankReader(cfg.class_counts_from) as reader:
            counts, counts_source = reader.info.class_counts, str(cfg.class_counts_from)
        if counts is None or counts.shape[0] != k:
            raise ExtractError(f"--class-counts-from {cfg.class_counts_from} has no class_counts for K={k} classes.")
    else:
        counts = sum(np.bincount(m[m != IGNORE_INDEX].ravel(), minlength=k) for m in masks).astype(np.int64)
        counts_source = f"pixels of the masks of {cfg.list_file}"
    rng = np.random.default_rng(cfg.seed)
    writer = None
    try:
        for start in progress_bar(range(0, len(pairs), cfg.batch_size), enabled=cfg.progress, desc="extracting", unit="batch"):
            batch = pairs[start:start + cfg.batch_size]
            views = [torch.from_numpy(np.array(decode_image(cfg.root / img).resize((prep.crop[1], prep.crop[0]), Image.Resampling.BILINEAR)))
                     for img, _ in batch]
            x = torch.stack(views).permute(0, 3, 1, 2).contiguous().to(model.device)  # (B, 3, H, W) uint8
            features, logits = model.features_and_logits(normalize(x, prep))  # (B, d, h, w), (B, K, h, w)
            h, w = features.shape[2:]
            if writer is None:
                geometry = {**prep.to_dict(), "task": "segmentation", "input_size": list(prep.crop), "feature_map": [h, w],
                            "upsample": UPSAMPLE, "pixels_per_image": cfg.pixels_per_image, "balanced": cfg.balanced,
                            "seed": cfg.seed, "images": len(pairs)}
                writer = BankWriter(cfg.out, feature_dim=d, class_names=_class_names(cfg.card, k), feature_dtype=cfg.feature_dtype,
                                    class_counts=counts, model_fingerprint=model.fingerprint, preprocessing=geometry,
                                    task="segmentation", classifier_weight=model.classifier_weight,
                                    classifier_bias=model.classifier_bias, extra_columns={"yx": ((2,), "int16")},
                                    overwrite=cfg.overwrite)
            feats = features.permute(0, 2, 3, 1).reshape(len(batch), h * w, d).cpu()  # (B, h·w, d)
            logs = logits.permute(0, 2, 3, 1).reshape(len(batch), h * w, k).cpu()
            if not (torch.isfinite(feats).all() and torch.isfinite(logs).all()):
                raise ExtractError(f"the model gave non-finite features or logits for list rows {start}..{start + len(batch) - 1}.")
            rows: dict[str, list] = {name: [] for name in ("features", "logits", "labels", "sample_index", "yx")}
            for i in range(len(batch)):
                labels = cell_labels(masks[start + i], h, w).ravel()
                keep = sample_pixels(labels, cfg.pixels_per_image, balanced=cfg.balanced, rng=rng)
                for name, value in (("features", feats[i, keep]), ("logits", logs[i, keep]), ("labels", labels[keep]),
                                    ("sample_index", np.full(keep.size, start + i, dtype=np.int64)),
                                    ("yx", np.stack([keep // w, keep % w], axis=1).astype(np.int16))):
                    rows[name].append(np.asarray(value))
            block = {name: np.concatenate(parts) for name, parts in rows.items()}
            writer.append(**block, view=np.zeros(block["labels"].size, np.int16))
        assert writer is not None
        return writer.finish({"class_counts_source": counts_source, "source": str(cfg.list_file), "model_spec": cfg.model})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
