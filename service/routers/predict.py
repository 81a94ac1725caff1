"""``POST /predict``: images in (multipart ``file`` fields or JSON base64), calibrated top-k out.

    curl -F file=@cat.jpg -F file=@dog.jpg 'http://127.0.0.1:8000/predict?top_k=3&raw=true'
    curl -H 'Content-Type: application/json' -d '{"images": ["<base64>"]}' http://127.0.0.1:8000/predict

Images are decoded on a worker thread, then micro-batched with other requests' images into shared
forward passes on the inference thread.
"""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from calib.errors import InputError
from service.dense import DensePredictResponse, DenseRuntime, predict_dense
from service.deps import RuntimeDep
from service.routers.common import check_count, decode_base64, predictions, resolve_top_k
from service.schemas import ImagePredictions, PredictJSON, PredictResponse, error_responses

router = APIRouter(tags=["predict"])

REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                                   "description": "one image file per field"}}},
            },
            "application/json": {"schema": PredictJSON.model_json_schema()},
        },
    }
}


async def read_images(request: Request, max_images: int) -> list[bytes]:
    """The image files of a multipart or JSON request body, as bytes."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        async with request.form(max_files=max_images, max_fields=max_images) as form:
            uploads = form.getlist("file")
            if not uploads:
                raise InputError("the multipart body should have at least one 'file' field.")
            check_count("images", len(uploads), max_images, "max_images")
            blobs = []
            for i, upload in enumerate(uploads):
                if not isinstance(upload, UploadFile):
                    raise InputError(f"'file' field {i} should be a file upload, found a text field.")
                blobs.append(await upload.read())
            return blobs
    if media_type == "application/json" or media_type.endswith("+json"):
        body = PredictJSON.model_validate_json(await request.body())
        check_count("images", len(body.images), max_images, "max_images")
        return decode_base64(body.images, "images")
    raise HTTPException(415, f"the body should be multipart/form-data or application/json, found {media_type or 'no Content-Type'}.")


@router.post("/predict", response_model=PredictResponse | DensePredictResponse, openapi_extra=REQUEST_BODY,
             responses=error_responses(400, 413, 415, 422, 503))
async def predict(
    request: Request,
    runtime: RuntimeDep,
    top_k: Annotated[int | None, Query(ge=1, description="classes per image (default min(5, K))")] = None,
    raw: Annotated[bool, Query(description="also return the stage-1 (uncalibrated) top-k")] = False,
) -> PredictResponse | DensePredictResponse:
    """Classify one or more images with the calibrated model (segment or detect, for a dense model: service.dense)."""
    if isinstance(runtime, DenseRuntime):
        return await predict_dense(runtime, await read_images(request, runtime.settings.max_images), raw)
    k = resolve_top_k(top_k, runtime.model.num_classes)
    blobs = await read_images(request, runtime.settings.max_images)
    images = await run_in_threadpool(runtime.image_tensor, blobs)  # (n, 3, H, W) uint8
    result = await runtime.classify(images)
    state = result.calibration
    calibrated = predictions(torch.softmax(result.calibrated_logits, dim=1), k, state)
    stage1 = predictions(torch.softmax(result.raw_logits, dim=1), k, state) if raw else [None] * len(calibrated)
    return PredictResponse(
        model_name=runtime.settings.model_name,
        calibration_version=state.version,
        predictions=[ImagePredictions(top_k=c, raw_top_k=r) for c, r in zip(calibrated, stage1, strict=True)],
    )
