"""Readers of the dense tasks' annotations, shared by the extractor and the evaluation (hence here, at the
bottom): COCO / LVIS JSON, ``image mask`` list files and the masks themselves. They read text and masks
only; images are decoded by the extractor.

Each raises :class:`~disalign.calib.errors.InputError` with one sentence naming the file and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from disalign.calib.defaults import IGNORE_INDEX
from disalign.calib.errors import InputError


def read_coco(path: str | Path) -> dict:
    """A COCO / LVIS JSON with ``images``, ``annotations`` and ``categories``, checked for what we use."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"--annotations {path} is not readable JSON ({exc}).") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"--annotations {path}: field '{key}' should be a list, found {type(data.get(key)).__name__}.")
    if not data["categories"]:
        raise InputError(f"--annotations {path} has no categories.")
    image_ids = {img["id"] for img in data["images"]}
    category_ids = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        if ann.get("image_id") not in image_ids or ann.get("category_id") not in category_ids:
            raise InputError(f"--annotations {path}: annotation {ann.get('id')} names an unknown image or category.")
        if not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4):
            raise InputError(f"--annotations {path}: annotation {ann.get('id')} should have a bbox [x, y, w, h].")
    return data


def sorted_categories(coco: dict) -> list[dict]:
    """The categories by id: category ``c`` of this order is class ``c + 1`` of a RoI bank (0 is background)."""
    return sorted(coco["categories"], key=lambda c: c["id"])


def read_pairs(list_file: str | Path) -> list[tuple[str, str]]:
    """``image mask`` pairs of a list file (paths relative to the root; blank lines and # comments skipped)."""
    list_file = Path(list_file)
    try:
        text = list_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--list file {list_file} is not a readable text file ({exc}).") from exc
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise InputError(f"{list_file} line {number}: expected 'image mask' (2 fields), found {len(fields)}: {line.strip()!r:.120}.")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise InputError(f"--list file {list_file} has no 'image mask' lines.")
    return pairs


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    """(H, W) int64 class ids, IGNORE_INDEX kept; any other id ≥ K is an error."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise InputError(f"mask {path} should be a single-channel image of class ids, found mode {img.mode}.")
            mask = np.asarray(img).astype(np.int64)
    except FileNotFoundError as exc:
        raise InputError(f"mask {path} does not exist.") from exc
    except OSError as exc:
        raise InputError(f"mask {path} could not be decoded ({exc}).") from exc
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        raise InputError(f"mask {path} has class id {int(mask[bad][0])}; ids should be 0..{num_classes - 1} or {IGNORE_INDEX} (ignore).")
    return mask
