"""Conversions between request bodies and tensors shared by several routers; each raises one sentence."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from calib.errors import InputError
from feature_extract.preprocess import declared_pixels

DEFAULT_TOP_K = 5
# Parsing or writing this much JSON takes about a millisecond: below it, the work costs less than handing it
# to a worker thread and is done on the event loop; above it, it goes to a thread so the loop stays responsive.
INLINE_JSON_BYTES = 64 * 1024
# The same rule for images, in the pixels their headers declare: never in bytes, since a 3 KB PNG can declare
# 25 Mpx (0.2-0.5 s of decoding). A 32 px JPEG decodes in about 0.1 ms, a 128 x 128 one in well under 1 ms.
INLINE_IMAGE_PIXELS = 128 * 128
JSON_BYTES_PER_NUMBER = 10  # a float32 written in its shortest form, with its comma
Body = TypeVar("Body", bound=BaseModel)
Result = TypeVar("Result")


async def off_loop_if_large(size: int, fn: Callable[..., Result], *args: Any, limit: int = INLINE_JSON_BYTES) -> Result:
    """``fn(*args)`` on the event loop for small work (``size`` bytes, ≤ ``limit``), on a worker thread for large."""
    if size <= limit:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


async def json_bytes(request: Request) -> bytes:
    """The raw body of a JSON request; 415 for a Content-Type that is not JSON."""
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise HTTPException(415, f"the body should be application/json, found {media_type}.")
    return await request.body()


async def read_json(request: Request, model: type[Body]) -> Body:
    """Validate a JSON body in one pass of pydantic's parser (no intermediate Python objects).

    pydantic's errors (invalid JSON included) become one 422 sentence.
    """
    body = await json_bytes(request)
    return await off_loop_if_large(len(body), model.model_validate_json, body)


async def json_response(payload: dict[str, Any], approx_values: int) -> Response:
    """Serialise a response with orjson; numpy arrays are written directly (float32 in its shortest form).

    ``approx_values``: how many numbers the payload holds, to decide whether to serialise off the loop.
    """
    content = await off_loop_if_large(approx_values * JSON_BYTES_PER_NUMBER, orjson.dumps, payload, None, orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, media_type="application/json")


class DirectRoute(APIRoute):
    """A route documented like any other whose endpoint is called with the bare :class:`Request`.

    For the hot routes that read and validate their own body: FastAPI's per-request dependency
    resolution costs about 0.1 ms, as much as the rest of a small request. The endpoint must take
    only ``request`` and return a :class:`Response` (the schema still comes from ``response_model``).
    """

    def get_route_handler(self) -> Callable[[Request], Any]:
        return self.endpoint


def resolve_top_k(requested: int | None, num_classes: int) -> int:
    if requested is None:
        return min(DEFAULT_TOP_K, num_classes)
    if not 1 <= requested <= num_classes:
        raise InputError(f"top_k should be between 1 and K={num_classes}, found {requested}.")
    return requested


def check_count(what: str, count: int, limit: int, setting: str) -> None:
    if count > limit:
        raise InputError(f"{what}: at most {limit} per request (DISALIGN_{setting.upper()}), found {count}.")


@functools.cache
def decode_pool() -> ThreadPoolExecutor:
    """The threads that decode large images: as many as cores (at most 4), not the 40 of the default pool, so
    a burst of 25 Mpx images costs at most that many decoded images in memory (75 MB each); the rest wait."""
    return ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="disalign-decode")


async def decode_images(image_tensor: Callable[[list[bytes]], Any], blobs: list[bytes]) -> Any:
    """A request's image files → ``image_tensor(blobs)``, on the loop when their headers declare few pixels,
    on a decoding thread when not (or when a header cannot be read: decoding will say why)."""
    pixels = 0
    for blob in blobs:
        declared = declared_pixels(blob)
        pixels += INLINE_IMAGE_PIXELS + 1 if declared is None else declared
    if pixels <= INLINE_IMAGE_PIXELS:
        return image_tensor(blobs)
    return await asyncio.get_running_loop().run_in_executor(decode_pool(), image_tensor, blobs)


def decode_base64(items: list[str], where: str) -> list[bytes]:
    """Base64 strings → bytes; 400 naming the first item that is not base64."""
    blobs = []
    for i, text in enumerate(items):
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"{where}[{i}] is not valid base64.") from None
    return blobs


def finite_float32(values: list, what: str) -> np.ndarray:
    """JSON numbers (nested lists) → float32 array; 422 when one is NaN or inf, or beyond the float32 range."""
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf, reported below
        array = np.asarray(values, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{what} must be finite float32 numbers; found NaN, inf or a value beyond ±3.4e38.")
    return array


def finite_or_raise(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        raise InputError(f"the {what} overflow float32 (NaN or inf); the input values are too large.")


def top_k_lists(indices: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> list[list[dict[str, Any]]]:
    """Per row ``[{label, index, probability}]`` from top-k indices and probabilities (n, k), for orjson."""
    return [[{"label": class_names[i], "index": i, "probability": p} for i, p in zip(row_i, row_p, strict=True)]
            for row_i, row_p in zip(indices.tolist(), probabilities, strict=True)]  # p: np.float32, written as such
