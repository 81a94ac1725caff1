"""What several routers share to read a request and write its answer over HTTP; each refusal is one sentence.

Payload checks that are not about HTTP are in :mod:`disalign.service.checks`, the choice between the event
loop and a thread in :mod:`disalign.service.offload`, the ``/v2`` wire format in :mod:`disalign.service.wire_v2`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from disalign.calib.errors import InputError
from disalign.service.offload import JSON_BYTES_PER_NUMBER, off_loop_if_large
from disalign.service.prior import BALANCED
from disalign.service.traffic import TOKEN_HEADER

DEFAULT_TOP_K = 5
SERVED = "served"
PRIOR_CHOICES = (SERVED, BALANCED)  # the values of a request's ``prior`` parameter
Body = TypeVar("Body", bound=BaseModel)


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


def use_served_prior(value: object) -> bool:
    """A request's ``prior`` parameter (query or v2 parameter; None when absent) → whether to apply the served prior."""
    if value is None or value == SERVED:
        return True
    if value == BALANCED:
        return False
    raise InputError(f"prior should be one of {', '.join(PRIOR_CHOICES)}, found {value!r:.40}.")


def traffic_source(request: Request, runtime: Any) -> str | None:
    """The trusted traffic source a request comes from (its ``Disalign-Traffic-Token``), None for any other:
    only such requests' rows may move the adaptive prior (:mod:`disalign.service.traffic`)."""
    return runtime.prior.source_of(request.headers.get(TOKEN_HEADER))


def resolve_top_k(requested: int | None, num_classes: int) -> int:
    if requested is None:
        return min(DEFAULT_TOP_K, num_classes)
    if not 1 <= requested <= num_classes:
        raise InputError(f"top_k should be between 1 and K={num_classes}, found {requested}.")
    return requested


def top_k_lists(indices: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> list[list[dict[str, Any]]]:
    """Per row ``[{label, index, probability}]`` from top-k indices and probabilities (n, k), for orjson."""
    return [[{"label": class_names[i], "index": i, "probability": p} for i, p in zip(row_i, row_p, strict=True)]
            for row_i, row_p in zip(indices.tolist(), probabilities, strict=True)]  # p: np.float32, written as such
