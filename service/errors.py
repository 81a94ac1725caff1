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
wrong shape, K, d, NaN/inf, schema    422
model not loaded yet / shutting down  503
too many bodies in flight             503
====================================  ======

408, 413, 431 and the in-flight 503 come from :mod:`disalign.service.limits`, most of them before the app runs.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from disalign.calib.errors import DisalignError
from disalign.feature_extract.preprocess import ImageDecodeError, ImageTooLargeError
from disalign.service.batcher import BatcherStopped
from disalign.service.checks import InvalidBase64
from disalign.service.messages import validation_sentence
from disalign.service.runtime import IncompatibleCalibration

log = logging.getLogger("service")


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
    return 422


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_sentence(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError) -> JSONResponse:
        return error_response(422, validation_sentence(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        sentence = exc.detail if isinstance(exc.detail, str) else "the request failed."
        if exc.status_code == 404 and sentence == "Not Found":
            sentence = f"there is no route {request.url.path}."
        elif exc.status_code == 400 and sentence == "There was an error parsing the body":
            sentence = "the request body could not be parsed; send UTF-8 JSON."
        elif exc.status_code == 405 and sentence == "Method Not Allowed":
            sentence = f"{request.method} is not allowed on {request.url.path}."
        return error_response(exc.status_code, sentence, getattr(exc, "headers", None))

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
