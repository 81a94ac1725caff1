"""Small models and scenes for the segmentation and detection tests, made in a temporary directory.

Scenes are synthetic (coloured squares on a noisy background), never CIFAR-derived; the trained
benchmark models live in ``examples/`` and are used by the end-to-end tests.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
FCN = REPO / "examples" / "segmentation" / "fcn.ts"
FCN_CARD = REPO / "examples" / "segmentation" / "fcn.json"
DETECTOR = REPO / "examples" / "detection" / "detector.pt"
DETECTOR_CARD = REPO / "examples" / "detection" / "detector.json"
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230]], dtype=np.float64)


class TinySegmenter(nn.Module):
    """Output stride 4, d = 8, K = 3: forward_features + a 1x1 conv classifier, like the benchmark FCN."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 4, stride=4)
        self.classifier = nn.Conv2d(8, 3, 1)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x))  # (N, 8, H/4, W/4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.forward_features(x))
        return F.interpolate(logits, size=(x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)


def tiny_segmenter(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # torch >= 2.14 deprecates TorchScript
        warnings.filterwarnings("ignore", message="`torch.jit")
        torch.jit.script(TinySegmenter().eval()).save(str(path))
    card = {"task": "segmentation", "input": {"size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "classes": ["red", "green", "blue"]}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def seg_scenes(root: Path, n: int, *, size: int = 16, seed: int = 0, name: str = "list.txt") -> Path:
    """``n`` size x size scenes of 2x2 coloured quadrants (class = colour), a few pixels 255; writes the list."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        classes = rng.choice(3, size=(2, 2), p=[0.6, 0.3, 0.1])
        mask = np.kron(classes, np.ones((size // 2, size // 2), dtype=np.int64)).astype(np.uint8)
        image = COLOURS[mask] + rng.normal(0, 20, size=(size, size, 3))
        mask[rng.random(mask.shape) < 0.05] = 255
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
        Image.fromarray(mask).save(root / "mask" / f"{i}.png")
        lines.append(f"img/{i}.png mask/{i}.png")
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def det_scenes(root: Path, n: int, *, size: int = 64, seed: int = 0, name: str = "coco.json", categories: list[dict] | None = None) -> Path:
    """``n`` size x size scenes with 1-3 coloured squares each; COCO JSON. Categories: red / green / blue
    (ids 1..3, drawn 60 / 30 / 10 %), or the given ones (drawn uniformly, colours cycling)."""
    rng = np.random.default_rng(seed)
    given = categories
    categories = given or [{"id": c + 1, "name": n_, "frequency": f} for c, (n_, f) in enumerate((("red", "f"), ("green", "c"), ("blue", "r")))]
    probabilities = None if given else [0.6, 0.3, 0.1]
    (root / "det").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        canvas = rng.normal(128, 10, size=(size, size, 3))
        for _ in range(int(rng.integers(1, 4))):
            s = int(rng.integers(12, 24))
            x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
            c = int(rng.choice(len(categories), p=probabilities))
            canvas[y:y + s, x:x + s] = COLOURS[c % 3]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": categories[c]["id"], "bbox": [x, y, s, s],
                                "area": s * s, "iscrowd": 0})
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(root / "det" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"det/{i}.png", "width": size, "height": size})
    (root / name).write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root / name


def tiny_detector(path: Path, seed: int = 0) -> Path:
    """An untrained compact Faster R-CNN (K = 3 categories) for 64 x 64 inputs: state_dict + card."""
    from disalign.feature_extract.detectors import COMPACT, build_detector

    torch.manual_seed(seed)
    kwargs = {"num_classes": 4, "channels": [8, 8, 16], "representation": 32, "image_size": 64, "anchor_sizes": [12, 24]}
    model = build_detector(COMPACT, kwargs)
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"task": "detection", "model": COMPACT, "model_kwargs": kwargs}))
    return path
