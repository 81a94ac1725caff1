"""Image lists and the decoding dataset.

Two inputs give an :class:`ImageList` (root, relative paths, labels):

- a list file in the ImageNet-LT convention, one ``relative/path label`` per line (label optional → -1),
  paths relative to ``--root``; blank lines and ``#`` comments are ignored;
- an image-folder tree ``root/<class>/<file>``: classes sorted, label = index in that order (or the index
  of the folder's name among the model card's class names, when every folder name is one of them).

:class:`ViewDataset` decodes one list row per item into all its views, as uint8 ``(V, H, W, 3)``; a row
that cannot be decoded comes back as an error string instead, so a DataLoader worker never dies on a bad
file. :func:`collate_views` stacks a batch and separates the failures.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from disalign.feature_extract.errors import ExtractError, ImageDecodeError
from disalign.feature_extract.preprocess import Preprocessing, check_pixels, decode_image, make_view

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageList:
    """Rows to extract: ``paths[i]`` (relative to ``root``) with label ``labels[i]`` (-1: unlabelled)."""

    root: Path
    paths: list[str]
    labels: np.ndarray  # (n,) int64
    class_names: list[str] | None = None  # folder mode: the sorted class folders

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def read_list(list_path: str | Path, root: str | Path) -> ImageList:
    """Parse a ``relative/path [label]`` list file; a malformed line raises naming its line number."""
    list_path = Path(list_path)
    try:
        text = list_path.read_text()
    except FileNotFoundError as exc:
        raise ExtractError(f"--list file {list_path} does not exist.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ExtractError(f"--list file {list_path} is not a readable text file ({exc}).") from exc
    paths: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) > 2:
            raise ExtractError(
                f"{list_path} line {number}: expected 'relative/path [label]' (2 fields at most, no spaces in paths), found {len(fields)} fields: {stripped!r:.120}."
            )
        label = -1
        if len(fields) == 2:
            try:
                label = int(fields[1])
            except ValueError:
                raise ExtractError(f"{list_path} line {number}: the label should be an integer, found {fields[1]!r}.") from None
            if label < -1:
                raise ExtractError(f"{list_path} line {number}: the label should be >= 0 (or -1 for unlabelled), found {label}.")
        paths.append(fields[0])
        labels.append(label)
    if not paths:
        raise ExtractError(f"--list file {list_path} has no image lines.")
    return ImageList(root=Path(root), paths=paths, labels=np.asarray(labels, dtype=np.int64))


def scan_folder(root: str | Path, known_classes: list[str] | None = None) -> ImageList:
    """``root/<class>/**/<image>`` → an ImageList; files sorted within each class."""
    root = Path(root)
    if not root.is_dir():
        raise ExtractError(f"--folder {root} is not a directory.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ExtractError(f"--folder {root} has no class sub-directories (expected root/<class>/<image>).")
    by_name = known_classes is not None and set(classes) <= set(known_classes)
    paths: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        label = known_classes.index(name) if by_name else index
        files = sorted(
            p.relative_to(root).as_posix()
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise ExtractError(f"--folder {root} has no image files (extensions {', '.join(IMAGE_EXTENSIONS)}).")
    return ImageList(root=root, paths=paths, labels=np.asarray(labels, dtype=np.int64), class_names=classes)


class _PathTable:
    """Paths packed in one bytes buffer + offsets: no per-path Python objects for forked workers to copy."""

    def __init__(self, paths: list[str]):
        encoded = [p.encode() for p in paths]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        self._ends = np.cumsum([len(p) for p in encoded], dtype=np.int64)

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return self._blob[start : int(self._ends[i])].tobytes().decode()


@dataclass
class Item:
    """One decoded list row: all its views (V, H, W, 3) uint8, or the reason it could not be decoded."""

    row: int
    views: list[np.ndarray] | None  # V arrays (H, W, 3) uint8
    error: str | None
    jpeg: torch.Tensor | None = None  # --decode torchvision: the undecoded file bytes, 1-D uint8


class ViewDataset(torch.utils.data.Dataset):
    """Item ``row`` = every view of list row ``row``; decoding failures are returned, not raised."""

    def __init__(
        self,
        images: ImageList,
        prep: Preprocessing,
        *,
        views: int = 1,
        seed: int = 0,
        max_pixels: int | None = None,
        draft: bool = True,
        decode: str = "pil",
        augment: str = "standard",
    ):
        self.root = images.root
        self.paths = _PathTable(images.paths)
        self.size = len(images)
        self.prep, self.views, self.seed, self.max_pixels = prep, views, seed, max_pixels
        self.augment = augment
        self.draft_size = prep.draft_size if draft else None
        self.device_jpegs = decode == "torchvision"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, row: int) -> Item:
        path = self.paths[row]
        try:
            source: bytes | Path = self.root / path
            if self.device_jpegs:
                source = _read_bytes(source)
                if _is_rgb_jpeg(source, self.max_pixels, path):
                    return Item(row, None, None, jpeg=torch.frombuffer(bytearray(source), dtype=torch.uint8))
            img = decode_image(source, self.max_pixels, draft_size=self.draft_size)
            views = [make_view(img, self.prep, v, seed=self.seed, row=row, augment=self.augment) for v in range(self.views)]
        except ImageDecodeError as exc:
            return Item(row, None, f"list row {row} ({path}): {exc}")
        return Item(row, views, None)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"image {path} does not exist.") from exc
    except OSError as exc:
        raise ImageDecodeError(f"image {path} could not be read ({exc}).") from exc


def _is_rgb_jpeg(data: bytes, max_pixels: int | None, name: str) -> bool:
    """A colour JPEG the device decoder can take (header only; the pixel limit is checked here)."""
    if data[:2] != b"\xff\xd8":
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except (OSError, ValueError, SyntaxError):
            return False  # Pillow will say why
    check_pixels(img.size, max_pixels, name)
    return img.format == "JPEG" and img.mode == "RGB"


def collate_views(items: list[Item]) -> dict:
    """→ ``images`` uint8 (n_host·V, H, W, 3) decoded on the host, ``rows`` int64 (n_ok,) all decodable rows,
    ``jpegs`` (undecoded file bytes of the rows where ``on_device``), ``bad_rows`` int64, ``errors`` list[str]."""
    good = [it for it in items if it.views is not None or it.jpeg is not None]
    bad = [it for it in items if it.views is None and it.jpeg is None]
    arrays = [view for it in good if it.views is not None for view in it.views]
    shape = (len(arrays), *arrays[0].shape) if arrays else (0, 0, 0, 3)
    if torch.utils.data.get_worker_info() is not None:
        # In a worker, fill a shared-memory tensor directly (as default_collate does): no extra copy on the way out.
        images = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)
    else:
        images = torch.empty(shape, dtype=torch.uint8)
    target = images.numpy()
    for i, view in enumerate(arrays):
        target[i] = view
    return {
        "images": images,
        "rows": torch.tensor([it.row for it in good], dtype=torch.int64),
        "on_device": torch.tensor([it.jpeg is not None for it in good], dtype=torch.bool),
        "jpegs": [it.jpeg for it in good if it.jpeg is not None],
        "bad_rows": torch.tensor([it.row for it in bad], dtype=torch.int64),
        "errors": [it.error for it in bad],
    }
