"""``POST /predict``: images in (multipart ``file`` fields or JSON base64), calibrated top-k out.

    curl -F file=@cat.jpg -F file=@dog.jpg 'http://127.0.0.1:8000/predict?top_k=3&raw=true'
    curl -H 'Content-Type: application/json' -d '{"images": ["<base64>"]}' http://127.0.0.1:8000/predict

Images are decoded on a worker thread, then micro-batched with other requests' images into shared
forward passes on the inference thread.
"""

from __future__ import annotations

import torch
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from disalign.calib.errors import InputError
from disalign.service.checks import check_count, decode_base64
from disalign.service.dense import DensePredictResponse, DenseRuntime, predict_dense
from disalign.service.deps import get_runtime
from disalign.service.offload import decode_images
from disalign.service.routers.common import (
    DirectRoute,
    json_response,
    read_json,
    resolve_top_k,
    top_k_lists,
    traffic_source,
    use_served_prior,
)
from disalign.service.schemas import (
    PredictJSON,
    PredictQuery,
    PredictResponse,
    error_responses,
    query_parameters,
)

router = APIRouter(tags=["predict"], route_class=DirectRoute)

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
        body = await read_json(request, PredictJSON)  # base64 bodies of several MiB are parsed off the loop
        check_count("images", len(body.images), max_images, "max_images")
        return decode_base64(body.images, "images")
    raise HTTPException(415, f"the body should be multipart/form-data or application/json, found {media_type or 'no Content-Type'}.")


def parse_query(request: Request) -> PredictQuery:
    try:
        return PredictQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:  # located as FastAPI locates query parameters: "query parameter top_k: …"
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]) from None


@router.post("/predict", response_model=PredictResponse | DensePredictResponse,
             openapi_extra={**REQUEST_BODY, "parameters": query_parameters(PredictQuery)},
             responses=error_responses(400, 413, 415, 422, 503))
async def predict(request: Request) -> Response:
    """Classify one or more images with the calibrated model (segment or detect, for a dense model: disalign.service.dense).

    Query parameters: ``top_k`` (classes per image, default min(5, K)), ``raw`` (also the stage-1 top-k) and
    ``prior`` (``balanced`` ignores the server's class prior, disalign.service.prior).
    """
    runtime = await get_runtime(request)
    query = parse_query(request)
    if isinstance(runtime, DenseRuntime):
        dense = await predict_dense(runtime, await read_images(request, runtime.settings.max_images), query.raw)
        return Response(dense.model_dump_json(), media_type="application/json")
    k = resolve_top_k(query.top_k, runtime.model.num_classes)
    blobs = await read_images(request, runtime.settings.max_images)
    images = await decode_images(runtime.image_tensor, blobs)  # (n, 3, H, W) uint8
    # aligned to the served prior unless balanced; a trusted source's images count towards the adaptive prior
    result = await runtime.classify(images, use_served_prior(query.prior), traffic_source(request, runtime))
    names = result.calibration.class_names

    def tops(logits: torch.Tensor) -> list[list[dict]]:
        probabilities, indices = torch.softmax(logits, dim=1).topk(k, dim=1)  # (n, k)
        return top_k_lists(indices.numpy(), probabilities.numpy(), names)

    calibrated = tops(result.calibrated_logits)
    stage1 = tops(result.raw_logits) if query.raw else [None] * len(calibrated)
    return await json_response({
        "model_name": runtime.settings.model_name,
        "calibration_version": result.calibration.version,
        "prior_version": result.prior_version,
        "predictions": [{"top_k": c, "raw_top_k": r} for c, r in zip(calibrated, stage1, strict=True)],
    }, approx_values=4 * k * len(calibrated))
