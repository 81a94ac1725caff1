"""Image preprocessing: decode with Pillow, clean and augmented views as uint8, normalisation on the device.

The data path never needs torchvision. A view is built on the CPU (in a DataLoader worker) as a uint8
``(H, W, 3)`` array; batches travel to the device as uint8 and :func:`normalize` turns them into the
float input of the model there (``x / 255``, then ``(x - mean) / std``, as torchvision's ``ToTensor`` +
``Normalize`` do).

Views: view 0 is the clean test transform (shorter side resized to ``resize``, then a centre crop; or,
with ``resize=None``, a straight resize to the crop size — a no-op when the image already has it).
Views 1..N-1 are augmentations seeded by ``(seed, list row, view)``: random resized crop + horizontal
flip, or for small inputs (crop ≤ 64 px, CIFAR-style) pad 4 + random crop + flip of the clean view
(``augment="standard"``, the stage-1 training augmentation); ``augment="official"`` is the augmentation of
the official DisAlign code's stage 2 at every size: random resized crop (scale 0.08–1) of the image to the
crop size, horizontal flip, and colour jitter (brightness, contrast and saturation each by a factor drawn
in [0.6, 1.4], in random order, as torchvision's ``ColorJitter(0.4, 0.4, 0.4)`` with Pillow's enhancers).
JPEGs are decoded with ``Image.draft`` (DCT-domain downscale by 2, 4 or 8) when the target is at least
twice smaller than the file, which is much faster and keeps at least the target resolution.

Images of more than 8 bits per sample are scaled to 8 bits, never clipped: 16-bit grayscale (Pillow
modes ``I;16*``, and ``I`` holding 16-bit samples) by ``round(v / 257)``, floating point (``F``) from
[0, 1] by ``round(v * 255)``; values outside those ranges are refused (their scale is unknown).
Pillow's own ``convert("RGB")`` clips them at 255, so a 16-bit photo would come out all white.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, UnidentifiedImageError

from disalign.calib import json_text
from disalign.calib.files import read_regular_file
from disalign.feature_extract.errors import ExtractError, ImageDecodeError, ImageTooLargeError

MAX_CARD_BYTES = 64 * 2**20  # a model card: sizes, mean, std and the class names
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_INPUT = 64  # crops up to this size use pad-and-crop augmentation instead of random resized crop
PAD = 4
AUGMENTS = ("standard", "official")  # what views >= 1 are (module docstring)
JITTER = 0.4  # the official stage 2's ColorJitter strength for brightness, contrast and saturation
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
# Resampling filters of the resize, by the name a model card, a bank and timm use.
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

__all__ = [
    "ImageDecodeError",
    "ImageTooLargeError",
    "Preprocessing",
    "PreprocessingOverrides",
    "augmented_view",
    "clean_view",
    "declared_pixels",
    "decode_image",
    "augmentation_name",
    "make_view",
    "normalize",
]


def _triple(value, field: str, source: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ExtractError(f"{source}: '{field}' should be 3 numbers (R, G, B), found {value!r}.") from exc
    if len(out) != 3:
        raise ExtractError(f"{source}: '{field}' should be 3 numbers (R, G, B), found {len(out)}.")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model input. ``crop`` is (H, W); ``resize`` the shorter side before the crop;
    ``interpolation`` the resampling filter of the resize (``bilinear`` or ``bicubic``)."""

    resize: int | None
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ExtractError(f"interpolation should be one of {', '.join(INTERPOLATIONS)}, found {self.interpolation!r}.")
        if len(self.crop) != 2 or min(self.crop) < 1:
            raise ExtractError(f"crop should be (H, W) with positive sizes, found {self.crop!r}.")
        if self.resize is not None and self.resize < 1:
            raise ExtractError(f"resize should be a positive shorter-side size or None, found {self.resize!r}.")
        if min(self.std) <= 0:
            raise ExtractError(f"std should be positive for each channel, found {self.std!r}.")

    @classmethod
    def imagenet(cls) -> Preprocessing:
        """ImageNet evaluation defaults: shorter side 256, centre crop 224, ImageNet mean/std."""
        return cls(resize=256, crop=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @classmethod
    def from_card(cls, path: str | Path) -> Preprocessing:
        """Read ``input.size`` ([H, W] or one int), ``input.mean``, ``input.std``, optional ``input.resize`` and
        ``input.interpolation`` (bilinear, the default, or bicubic)."""
        path = Path(path)
        try:
            card = json_text.loads(read_regular_file(path, ExtractError, max_bytes=MAX_CARD_BYTES), f"model card {path}", ExtractError)
        except FileNotFoundError as exc:
            raise ExtractError(f"model card {path} does not exist.") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExtractError(f"model card {path} is not readable JSON ({exc}).") from exc
        spec = card.get("input") if isinstance(card, dict) else None
        if not isinstance(spec, dict):
            raise ExtractError(f"model card {path}: field 'input' should be an object with size, mean and std, found {spec!r}.")
        for key in ("size", "mean", "std"):
            if key not in spec:
                raise ExtractError(f"model card {path}: field 'input.{key}' is missing.")
        size = spec["size"]
        if isinstance(size, int):
            size = [size, size]
        if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
            raise ExtractError(f"model card {path}: field 'input.size' should be [H, W] positive integers, found {size!r}.")
        resize = spec.get("resize")
        if resize is not None and not (isinstance(resize, int) and resize > 0):
            raise ExtractError(f"model card {path}: field 'input.resize' should be a positive integer, found {resize!r}.")
        interpolation = spec.get("interpolation", "bilinear")
        if interpolation not in INTERPOLATIONS:
            raise ExtractError(f"model card {path}: field 'input.interpolation' should be one of {', '.join(INTERPOLATIONS)}, "
                               f"found {interpolation!r}.")
        source = f"model card {path}"
        return cls(
            resize=resize,
            crop=(int(size[0]), int(size[1])),
            mean=_triple(spec["mean"], "input.mean", source),
            std=_triple(spec["std"], "input.std", source),
            interpolation=interpolation,
        )

    def first_difference(self, other: Preprocessing) -> tuple[str, str, str] | None:
        """``(field, mine, theirs)`` of the first field where ``other`` differs (numbers within 1e-6), else None.

        The one rule for "the same preprocessing": a card against a model's config at extraction, a card
        or the served preprocessing against a calibration's banks in the server.
        """
        for name in PREPROCESSING_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if not _same_value(mine, theirs):
                return name, _show(mine), _show(theirs)
        return None

    @property
    def small(self) -> bool:
        """Small inputs (≤ 64 px) are augmented by pad-and-crop instead of random resized crop."""
        return max(self.crop) <= SMALL_INPUT

    @property
    def augmentation(self) -> str:
        return "pad4-crop-flip" if self.small else "random-resized-crop-flip"

    @property
    def draft_size(self) -> tuple[int, int]:
        """(W, H) the decoded JPEG must keep at least: the resize target, so ``Image.draft`` never loses detail."""
        if self.resize is not None:
            return (self.resize, self.resize)
        return (self.crop[1], self.crop[0])

    def to_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": list(self.crop),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "augmentation": self.augmentation,
        }

    @classmethod
    def from_record(cls, record: dict) -> Preprocessing:
        """The preprocessing a bank (or a calibration, which copies its training bank's) records; a record
        written before ``interpolation`` was configurable is bilinear."""
        crop = record["crop"]
        return cls(resize=record.get("resize"), crop=(int(crop[0]), int(crop[1])),
                   mean=tuple(float(v) for v in record["mean"]), std=tuple(float(v) for v in record["std"]),  # type: ignore[arg-type]
                   interpolation=record.get("interpolation", "bilinear"))


PREPROCESSING_FIELDS = ("resize", "crop", "mean", "std", "interpolation")


def _same_value(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, tuple):
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b, strict=True))
    return a == b


def _show(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return "none" if value is None else str(value)


@dataclass(frozen=True)
class PreprocessingOverrides:
    """Fields given on the command line (``--resize``, ``--no-resize``, ``--crop``, ``--mean``, ``--std``,
    ``--interpolation``): applied on top of whatever the preprocessing comes from (card, model config, defaults)."""

    resize: int | None = None
    no_resize: bool = False
    crop: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None

    def __bool__(self) -> bool:
        return self.no_resize or any(v is not None for v in (self.resize, self.crop, self.mean, self.std, self.interpolation))

    def apply(self, base: Preprocessing) -> Preprocessing:
        return Preprocessing(
            resize=None if self.no_resize else (self.resize if self.resize is not None else base.resize),
            crop=self.crop or base.crop,
            mean=self.mean or base.mean,
            std=self.std or base.std,
            interpolation=self.interpolation or base.interpolation,
        )


def decode_image(
    data: bytes | str | Path, max_pixels: int | None = None, *, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode a file or bytes to an RGB image.

    The pixel count is checked from the header, before the full decode. ``draft_size`` (W, H) lets a
    JPEG be decoded at 1/2, 1/4 or 1/8 scale while staying at least that large.
    Raises :class:`ImageDecodeError` (missing, truncated, not an image) or :class:`ImageTooLargeError`.
    """
    in_memory = isinstance(data, bytes | bytearray | memoryview)
    name = "<bytes>" if in_memory else str(data)
    try:
        if not in_memory:
            with open(data, "rb") as fh:  # one read; the image then owns an in-memory buffer, no open file
                data = fh.read()
        with warnings.catch_warnings():
            # Pillow warns on large or odd files; our own checks below decide instead.
            warnings.simplefilter("ignore")
            formats = ("JPEG",) if data[:2] == b"\xff\xd8" else None  # skip format sniffing for the common case
            img = Image.open(io.BytesIO(data), formats=formats)
            check_pixels(img.size, max_pixels, name)
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
        return to_rgb(img, name)
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"image {name} does not exist.") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image {name} is too large to decode safely ({_plain(exc)}).") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"image {name} could not be decoded (not an image format Pillow reads: JPEG, PNG, BMP, GIF, TIFF, WebP …).") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"image {name} could not be decoded ({_plain(exc)}).") from exc


def declared_pixels(data: bytes) -> int | None:
    """Width x height that an image file's header declares (no pixel is decoded), or None when unreadable.

    The service calls this on the event loop to decide where to decode, so it must stay cheap whatever the
    file declares: ``Image.open`` is lazy, it reads the header (the same one :func:`decode_image` trusts)
    and stops. Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``) is kept out of the answer: its warning
    is silenced, as in :func:`decode_image`; its error, for a header beyond twice the limit, means "larger
    than anything Pillow will decode", so the smallest such count is returned instead of None.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the caller decides what is too large
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        return width * height
    except Image.DecompressionBombError:
        return 2 * Image.MAX_IMAGE_PIXELS + 1 if Image.MAX_IMAGE_PIXELS is not None else None
    except Exception:  # noqa: BLE001 — any unreadable header: the caller treats it as large, decode_image reports it
        return None


_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


def _plain(exc: BaseException) -> str:
    """Pillow's message without object reprs (``<_io.BytesIO object at 0x7f…>``): they mean nothing to a user."""
    return _OBJECT_REPR.sub("the data", str(exc)) or type(exc).__name__


SIXTEEN_BIT_MAX = 65535


def to_rgb(img: Image.Image, name: str = "<bytes>") -> Image.Image:
    """An RGB image; samples of more than 8 bits are scaled to 8 bits (module docstring), never clipped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img)  # (H, W) uint16 (I;16, any byte order) or int32 (I)
        if values.size and (int(values.min()) < 0 or int(values.max()) > SIXTEEN_BIT_MAX):
            raise ImageDecodeError(f"image {name} has 32-bit integer samples outside 0..{SIXTEEN_BIT_MAX}; "
                                   "only 8- and 16-bit integer images have a known scale.")
        wide = values.astype(np.uint32)  # v * 255 < 2**24: no overflow
        gray = ((wide * 255 + SIXTEEN_BIT_MAX // 2) // SIXTEEN_BIT_MAX).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ImageDecodeError(f"image {name} has floating-point samples outside [0, 1] (or NaN); "
                                   "float images are read as 0 = black, 1 = white.")
        return Image.fromarray(np.rint(values * 255.0).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def check_pixels(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"image {name} has {width}x{height} = {width * height} pixels, more than max_pixels={max_pixels}.")


def clean_geometry(width: int, height: int, prep: Preprocessing) -> tuple[int, int, int, int]:
    """(resized W, resized H, crop left, crop top) of the clean view of a ``width`` x ``height`` image."""
    out_h, out_w = prep.crop
    if prep.resize is None:
        return out_w, out_h, 0, 0
    scale = prep.resize / min(width, height)
    new_w, new_h = (prep.resize, round(height * scale)) if width <= height else (round(width * scale), prep.resize)
    return new_w, new_h, int(round((new_w - out_w) / 2.0)), int(round((new_h - out_h) / 2.0))


def _clean_hwc(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """The clean view as (H, W, 3) uint8: resize + centre crop in one resampling pass (none if the scale is 1)."""
    out_h, out_w = prep.crop
    w, h = img.size
    new_w, new_h, left, top = clean_geometry(w, h, prep)
    if (new_w, new_h) == (w, h) and left >= 0 and top >= 0:
        return np.asarray(img)[top : top + out_h, left : left + out_w]  # a view: no resampling, no extra copy
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
    return np.asarray(img.resize((out_w, out_h), INTERPOLATIONS[prep.interpolation], box=box))


def _rng(seed: int, row: int, view: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(row), int(view)])


def _random_resized_crop_box(rng: np.random.Generator, w: int, h: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters (scale 0.08–1, ratio 3/4–4/3) as a (left, top, right, bottom) box.

    Kept here rather than calling ``RandomResizedCrop.get_params``, for two reasons: torchvision is an
    optional extra, and the data path must run without it (module docstring); and ``get_params`` draws
    from torch's global RNG, whose state depends on the DataLoader worker and on which rows it decoded
    before, while these draws come from ``rng``, seeded by (seed, row, view), so a view is the same
    whatever the worker count, the order or a resume. The steps and the order of the draws are
    torchvision's, line for line: tests/feature_extract/test_preprocess.py feeds both the same draws and
    compares the boxes.
    """
    area = w * h
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return (left, top, left + cw, top + ch)
    ratio = w / h  # fallback: centre crop with the ratio clamped to the allowed range
    if ratio < RRC_RATIO[0]:
        cw, ch = w, int(round(w / RRC_RATIO[0]))
    elif ratio > RRC_RATIO[1]:
        cw, ch = int(round(h * RRC_RATIO[1])), h
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return (left, top, left + cw, top + ch)


def _augmented_hwc(img: Image.Image, prep: Preprocessing, rng: np.random.Generator) -> np.ndarray:
    out_h, out_w = prep.crop
    if prep.small:
        clean = _clean_hwc(img, prep)
        padded = np.pad(clean, ((PAD, PAD), (PAD, PAD), (0, 0)))
        top, left = int(rng.integers(0, 2 * PAD + 1)), int(rng.integers(0, 2 * PAD + 1))
        out = padded[top : top + out_h, left : left + out_w]
    else:
        box = _random_resized_crop_box(rng, *img.size)
        out = np.asarray(img.resize((out_w, out_h), INTERPOLATIONS[prep.interpolation], box=box))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def _official_hwc(img: Image.Image, prep: Preprocessing, rng: np.random.Generator) -> np.ndarray:
    """The official DisAlign stage-2 view: random resized crop, flip, colour jitter (module docstring)."""
    out_h, out_w = prep.crop
    box = _random_resized_crop_box(rng, *img.size)
    out = img.crop(box).resize((out_w, out_h), INTERPOLATIONS[prep.interpolation])  # as torchvision's resized_crop
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # torchvision's ColorJitter on a PIL image uses these same enhancers, in a random order of the factors.
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    factors = rng.uniform(1 - JITTER, 1 + JITTER, size=3)
    for index in rng.permutation(3):
        out = enhancers[index](out).enhance(float(factors[index]))
    return np.asarray(out)


def make_view(img: Image.Image, prep: Preprocessing, view: int = 0, *, seed: int = 0, row: int = 0,
              augment: str = "standard") -> np.ndarray:
    """View ``view`` of an image as a uint8 (H, W, 3) array (maybe a read-only view of the decoded image);
    views ≥ 1 are ``augment`` views seeded by (seed, row, view)."""
    if view == 0:
        return _clean_hwc(img, prep)
    if augment == "official":
        return _official_hwc(img, prep, _rng(seed, row, view))
    return _augmented_hwc(img, prep, _rng(seed, row, view))


def augmentation_name(prep: Preprocessing, augment: str) -> str:
    """What a bank records as its views' augmentation."""
    return "official-random-resized-crop-flip-color-jitter" if augment == "official" else prep.augmentation


def clean_view(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """The clean test view: (3, H, W) uint8."""
    return torch.from_numpy(np.array(make_view(img, prep, 0))).permute(2, 0, 1).contiguous()


def augmented_view(img: Image.Image, prep: Preprocessing, *, seed: int, row: int, view: int) -> torch.Tensor:
    """Augmented view ``view`` ≥ 1 of list row ``row``: (3, H, W) uint8, deterministic given (seed, row, view)."""
    if view < 1:
        raise ExtractError(f"augmented views are numbered from 1 (view 0 is the clean view), found view={view}.")
    return torch.from_numpy(np.array(make_view(img, prep, view, seed=seed, row=row))).permute(2, 0, 1).contiguous()


@lru_cache(maxsize=16)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return m, s


def normalize(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (N, 3, H, W) on any device → float32 ``(x / 255 - mean) / std`` on the same device.

    The memory format of ``batch`` is kept (a channels-last uint8 batch gives a channels-last float batch).
    """
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
        raise ExtractError(f"normalize expects a uint8 (N, 3, H, W) batch, found {batch.dtype} of shape {tuple(batch.shape)}.")
    mean, std = _stats(prep.mean, prep.std, batch.device)
    return batch.float().div_(255.0).sub_(mean).div_(std)
