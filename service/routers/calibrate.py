"""``POST /calibrate``: stage-1 features and logits in, calibrated logits, probabilities and top-k out."""

from __future__ import annotations

import torch
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from calib.errors import InputError
from service.deps import RuntimeDep
from service.routers.common import (
    check_count,
    finite_or_raise,
    float32_tensor,
    predictions,
    read_json,
    resolve_top_k,
)
from service.runtime import Runtime
from service.schemas import (
    CalibrateRequest,
    CalibrateResponse,
    CalibrateResult,
    CalibrateRow,
    error_responses,
    json_body,
)

router = APIRouter(tags=["calibrate"])


def rows_to_tensors(rows: list[CalibrateRow], num_classes: int, feature_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """JSON rows → features (N, d), logits (N, K) float32; 422 naming the first row of the wrong length."""
    for i, row in enumerate(rows):
        if len(row.features) != feature_dim:
            raise InputError(f"rows[{i}].features has {len(row.features)} values, expected d={feature_dim}.")
        if len(row.logits) != num_classes:
            raise InputError(f"rows[{i}].logits has {len(row.logits)} values, expected K={num_classes}.")
    features = float32_tensor([row.features for row in rows])  # (N, d)
    logits = float32_tensor([row.logits for row in rows])  # (N, K)
    return features, logits


def _calibrate(runtime: Runtime, body: CalibrateRequest) -> CalibrateResponse:
    model = runtime.model
    check_count("rows", len(body.rows), runtime.settings.max_rows, "max_rows")
    k = resolve_top_k(body.top_k, model.num_classes)
    features, logits = rows_to_tensors(body.rows, model.num_classes, model.feature_dim)
    state, calibrated = runtime.calibrate(features, logits)
    finite_or_raise(calibrated, "calibrated logits")
    probabilities = torch.softmax(calibrated, dim=1)
    tops = predictions(probabilities, k, state)
    # Built without re-validation: every value comes from the tensors above.
    results = [CalibrateResult.model_construct(logits=z, probabilities=p, top_k=t)
               for z, p, t in zip(calibrated.tolist(), probabilities.tolist(), tops, strict=True)]
    return CalibrateResponse.model_construct(model_name=runtime.settings.model_name, calibration_version=state.version,
                                             results=results)


@router.post("/calibrate", response_model=CalibrateResponse, openapi_extra=json_body(CalibrateRequest),
             responses=error_responses(413, 415, 422, 503))
async def calibrate(request: Request, runtime: RuntimeDep) -> Response:
    """Calibrate rows of cached stage-1 outputs: ``{"rows": [{"features": [d floats], "logits": [K floats]}], "top_k": 5}``."""
    body = await read_json(request, CalibrateRequest)
    result = await run_in_threadpool(_calibrate, runtime, body)
    # Serialised once by pydantic-core: returning the model would make FastAPI dump, re-validate and
    # serialise K floats per row again (the schema is still documented by response_model).
    return Response(result.model_dump_json(), media_type="application/json")
