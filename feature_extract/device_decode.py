"""``--decode torchvision``: JPEGs decoded on the model's device (nvJPEG on CUDA) instead of in the workers.

With Pillow decoding, the CPU cores feeding a fast GPU are the bottleneck; here the DataLoader workers
only read the file bytes and parse the JPEG header (size check, colour mode), and the main process
decodes the whole batch with one ``torchvision.io.decode_jpeg(list, device=...)`` call, then resizes and
crops on the device with the same geometry as the Pillow path (:func:`~.preprocess.clean_geometry`;
the preprocessing's bilinear or bicubic filter with antialiasing, so pixels differ slightly from Pillow's). Files that are not baseline RGB
JPEGs are decoded with Pillow in the worker as usual; a JPEG the device decoder rejects is retried with
Pillow before it is declared bad. Only the clean view (``--views 1``) is supported. torchvision is
imported lazily: it is an optional extra.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from disalign.feature_extract.errors import ExtractError, ImageDecodeError
from disalign.feature_extract.preprocess import Preprocessing, clean_geometry, decode_image, make_view

DECODERS = ("pil", "torchvision")


def require_torchvision_io():
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as exc:
        raise ExtractError("--decode torchvision needs the optional dependency torchvision; install it with pip install 'disalign[torchvision]'.") from exc
    return decode_jpeg, ImageReadMode


def clean_views_on_device(decoded: list[torch.Tensor], prep: Preprocessing) -> torch.Tensor:
    """Decoded uint8 (3, h, w) images on one device → clean views (n, 3, H, W) uint8, channels-last.

    Images of equal size are resized together; an image whose scale is 1 is only cropped.
    """
    out_h, out_w = prep.crop
    device = decoded[0].device
    out = torch.empty((len(decoded), 3, out_h, out_w), dtype=torch.uint8, device=device)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(decoded):
        groups[(int(img.shape[1]), int(img.shape[2]))].append(i)
    for (h, w), index in groups.items():
        batch = torch.stack([decoded[i] for i in index])  # (k, 3, h, w)
        new_w, new_h, left, top = clean_geometry(w, h, prep)
        if (new_w, new_h) != (w, h):
            resized = F.interpolate(batch.float(), size=(new_h, new_w), mode=prep.interpolation, antialias=True, align_corners=False)
            batch = resized.round_().clamp_(0, 255).to(torch.uint8)
        out[torch.tensor(index, device=device)] = batch[:, :, top : top + out_h, left : left + out_w]
    return out.contiguous(memory_format=torch.channels_last)


def decode_batch_on_device(
    jpegs: list[torch.Tensor], prep: Preprocessing, device: torch.device, names: list[str], max_pixels: int | None
) -> tuple[torch.Tensor | None, list[int], dict[int, str]]:
    """Decode + clean views of ``jpegs`` (1-D uint8 file bytes) on ``device``.

    Returns the views (m, 3, H, W) of the decodable ones, their indices into ``jpegs`` (ascending), and
    ``{index: error}`` for those neither the device decoder nor Pillow could read.
    """
    decode_jpeg, read_mode = require_torchvision_io()
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg(jpegs, mode=read_mode.RGB, device=device))
    except RuntimeError:  # one bad file fails the batch call: decode one by one
        decoded = []
        for data in jpegs:
            try:
                decoded.append(decode_jpeg(data, mode=read_mode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    ok = [i for i, img in enumerate(decoded) if img is not None]
    on_device = clean_views_on_device([decoded[i] for i in ok], prep) if ok else None
    if len(ok) == len(jpegs):
        return on_device, ok, {}
    views: list[torch.Tensor | None] = [None] * len(jpegs)
    for j, i in enumerate(ok):
        views[i] = on_device[j]
    errors: dict[int, str] = {}
    for i, img in enumerate(decoded):
        if img is None:  # e.g. a JPEG flavour the device decoder does not support: Pillow decides
            try:
                pil = decode_image(jpegs[i].numpy().tobytes(), max_pixels)
                views[i] = torch.from_numpy(np.array(make_view(pil, prep))).permute(2, 0, 1).to(device)
            except ImageDecodeError as exc:
                errors[i] = f"{names[i]}: {exc}"
    good = [i for i in range(len(jpegs)) if views[i] is not None]
    if not good:
        return None, [], errors
    return torch.stack([views[i] for i in good]).contiguous(memory_format=torch.channels_last), good, errors
