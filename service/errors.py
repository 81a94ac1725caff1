"""Every error response is ``{"error": "<one sentence>"}`` with the status below; nothing answers 500 on purpose.

====================================  ======
what went wrong                       status
====================================  ======
undecodable image, bad base64         400
missing or wrong admin token          401
admin routes disabled (no token set)  403
unknown model name or route           404
request head or body too slow         408
unsupported Content-Type              415
body or image too large               413
request line and headers over 64 KiB  431
calibration does not fit the model    409
the prior cannot be published         409
wrong shape, K, d, NaN/inf, schema    422
model not loaded yet / shutting down  503
a reload slower than its timeout      503
too many bodies in flight             503
client gone before its body ended     499
====================================  ======

A 499 (nginx's "client closed request") is never read by anyone: it is what ``disalign_requests_total``
records, with one log line and no traceback.

408, 413, 431 and the in-flight 503 come from :mod:`disalign.service.limits`, most of them before the app runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from disalign.calib.errors import DisalignError
from disalign.feature_extract.preprocess import ImageDecodeError, ImageTooLargeError
from disalign.service.batcher import BatcherStopped
from disalign.service.checks import InvalidBase64
from disalign.service.messages import validation_sentence
from disalign.service.prior import PriorStoreError
from disalign.service.reloader import ReloadTimeout
from disalign.service.runtime import IncompatibleCalibration

log = logging.getLogger("service")


# What the metrics record for a request whose client went away before its body was complete (nothing is sent:
# there is no one to send it to). nginx's "client closed request".
CLIENT_CLOSED = 499


def error_response(status: int, sentence: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": sentence}, status_code=status, headers=headers)


def disalign_status(exc: DisalignError) -> int:
    """The HTTP status of a library error."""
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, ImageDecodeError | InvalidBase64):
        return 400
    if isinstance(exc, IncompatibleCalibration):
        return 409
    if isinstance(exc, ReloadTimeout):
        return 503
    if isinstance(exc, PriorStoreError):
        return 409
    return 422


def allowed_methods(routers: Sequence[APIRouter], path: str) -> str:
    """The ``Allow`` header of a 405: the methods of every route on ``path`` (Starlette names only the first
    route that matched the path, so ``GET`` and ``POST /admin/prior``, two routes, answered ``Allow: GET``)."""
    methods: set[str] = set()
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.path_regex.match(path):
                methods.update(route.methods)
    return ", ".join(sorted(methods))


def client_closed(request: Request) -> JSONResponse:
    """A client that closed its connection mid-body: one log line (no traceback; it happens all the time on a
    busy server) and an answer no one will read."""
    client = request.client
    log.info("the client %s closed the connection before its request body to %s %s was complete",
             f"{client.host}:{client.port}" if client else "?", request.method, request.url.path)
    return error_response(CLIENT_CLOSED, "the client closed the connection before the request body was complete.")


def install_error_handlers(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """``routers``: those the app includes (their routes name the methods of a 405's ``Allow``)."""
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_sentence(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError) -> JSONResponse:
        return error_response(422, validation_sentence(exc.errors()))

    @app.exception_handler(ClientDisconnect)
    async def _closed(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return client_closed(request)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's own body reader wraps it in a 400
            return client_closed(request)
        sentence = exc.detail if isinstance(exc.detail, str) else "the request failed."
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404 and sentence == "Not Found":
            sentence = f"there is no route {request.url.path}."
        elif exc.status_code == 400 and sentence == "There was an error parsing the body":
            sentence = ("the request body is not valid JSON (nested too deeply)." if isinstance(exc.__cause__, RecursionError)
                        else "the request body could not be parsed; send UTF-8 JSON.")
        elif exc.status_code == 405:
            if sentence == "Method Not Allowed":
                sentence = f"{request.method} is not allowed on {request.url.path}."
            headers = {**(headers or {}), "Allow": allowed_methods(routers, request.url.path)}
        return error_response(exc.status_code, sentence, headers)

    @app.exception_handler(DisalignError)
    async def _disalign(request: Request, exc: DisalignError) -> JSONResponse:
        return error_response(disalign_status(exc), str(exc))

    @app.exception_handler(BatcherStopped)
    async def _stopped(request: Request, exc: BatcherStopped) -> JSONResponse:
        return error_response(503, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # a bug: logged with its traceback
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log.")
