"""One-sentence checks of request payloads shared by the JSON routes and the v2 wire format; no HTTP here.

Each raises a :class:`~disalign.calib.errors.InputError` (422, or 400 on ``/v2``) naming what was wrong,
except :class:`InvalidBase64`, which answers 400 everywhere (:func:`disalign.service.errors.disalign_status`).
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from disalign.calib.errors import InputError


class InvalidBase64(InputError):
    """A base64 string of an image that is not base64 (400, like an image that cannot be decoded)."""


def check_count(what: str, count: int, limit: int, setting: str) -> None:
    if count > limit:
        raise InputError(f"{what}: at most {limit} per request (DISALIGN_{setting.upper()}), found {count}.")


def decode_base64(items: list[str], where: str) -> list[bytes]:
    """Base64 strings → bytes; :class:`InvalidBase64` naming the first item that is not base64."""
    blobs = []
    for i, text in enumerate(items):
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidBase64(f"{where}[{i}] is not valid base64.") from None
    return blobs


def finite_float32(values: list, what: str) -> np.ndarray:
    """JSON numbers (nested lists) → float32 array; 422 when one is NaN or inf, or beyond the float32 range."""
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf, reported below
        array = np.asarray(values, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{what} must be finite float32 numbers; found NaN, inf or a value beyond ±3.4e38.")
    return array


def finite_or_raise(array: np.ndarray, what: str) -> None:
    """Refuse a computed result (calibrated logits) that overflowed float32."""
    if not np.isfinite(array).all():
        raise InputError(f"the {what} overflow float32 (NaN or inf); the input values are too large.")
