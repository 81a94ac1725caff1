"""Conversions between request bodies and tensors shared by several routers; each raises one sentence."""

from __future__ import annotations

import base64
import binascii
from typing import TypeVar

import numpy as np
import torch
from fastapi import HTTPException, Request
from pydantic import BaseModel

from calib.errors import InputError
from service.runtime import CalibrationState, top_k
from service.schemas import Prediction

DEFAULT_TOP_K = 5
Body = TypeVar("Body", bound=BaseModel)


async def read_json(request: Request, model: type[Body]) -> Body:
    """Validate a JSON body in one pass of pydantic's parser (no intermediate Python objects).

    415 for a Content-Type that is not JSON; pydantic's errors (invalid JSON included) become one 422 sentence.
    """
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise HTTPException(415, f"the body should be application/json, found {media_type}.")
    return model.model_validate_json(await request.body())


def resolve_top_k(requested: int | None, num_classes: int) -> int:
    if requested is None:
        return min(DEFAULT_TOP_K, num_classes)
    if not 1 <= requested <= num_classes:
        raise InputError(f"top_k should be between 1 and K={num_classes}, found {requested}.")
    return requested


def check_count(what: str, count: int, limit: int, setting: str) -> None:
    if count > limit:
        raise InputError(f"{what}: at most {limit} per request (DISALIGN_{setting.upper()}), found {count}.")


def decode_base64(items: list[str], where: str) -> list[bytes]:
    """Base64 strings → bytes; 400 naming the first item that is not base64."""
    blobs = []
    for i, text in enumerate(items):
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"{where}[{i}] is not valid base64.") from None
    return blobs


def float32_tensor(values: list) -> torch.Tensor:
    """JSON numbers (nested lists) → float32 tensor; values beyond float32 become inf (rejected later as non-finite)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return torch.from_numpy(np.asarray(values, dtype=np.float32))


def finite_or_raise(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise InputError(f"the {what} overflow float32 (NaN or inf); the input values are too large.")
    return tensor


def predictions(probabilities: torch.Tensor, k: int, state: CalibrationState) -> list[list[Prediction]]:
    """Per row the top-k as schema objects. probabilities (N, K)."""
    return [[Prediction(**p) for p in row] for row in top_k(probabilities, k, state.class_names)]
