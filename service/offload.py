"""What runs on the event loop and what goes to a thread: small work inline, large work off the loop.

Handing work to a thread costs about as much as a millisecond of it; below that the loop does it itself,
above it a thread does, so the loop stays responsive (``/v2/health/live`` answers throughout).
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from disalign.feature_extract.preprocess import declared_pixels

# Parsing or writing this much JSON takes about a millisecond: below it, the work costs less than handing it
# to a worker thread and is done on the event loop; above it, it goes to a thread so the loop stays responsive.
INLINE_JSON_BYTES = 64 * 1024
# The same rule for images, in the pixels their headers declare: never in bytes, since a 3 KB PNG can declare
# 25 Mpx (0.2-0.5 s of decoding). A 32 px JPEG decodes in about 0.1 ms, a 128 x 128 one in well under 1 ms.
INLINE_IMAGE_PIXELS = 128 * 128
JSON_BYTES_PER_NUMBER = 10  # a float32 written in its shortest form, with its comma
Result = TypeVar("Result")


async def off_loop_if_large(size: int, fn: Callable[..., Result], *args: Any, limit: int = INLINE_JSON_BYTES) -> Result:
    """``fn(*args)`` on the event loop for small work (``size`` bytes, ≤ ``limit``), on a worker thread for large."""
    if size <= limit:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


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
