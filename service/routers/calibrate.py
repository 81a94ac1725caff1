"""``POST /calibrate``: stage-1 features and logits in, calibrated logits, probabilities and top-k out.

The hot path of the service: the body is validated by pydantic into two float32 arrays, the rows are
calibrated in a row micro-batch with those of concurrent requests (:meth:`Runtime.calibrate_rows`),
and the response is written by orjson straight from the result arrays.
"""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request, Response

from disalign.calib.errors import InputError
from disalign.service.checks import check_count, finite_float32, finite_or_raise
from disalign.service.deps import get_runtime
from disalign.service.offload import off_loop_if_large
from disalign.service.routers.common import (
    DirectRoute,
    json_bytes,
    json_response,
    resolve_top_k,
    top_k_lists,
    traffic_source,
    use_served_prior,
)
from disalign.service.runtime import RowRequest
from disalign.service.schemas import (
    CalibrateRequest,
    CalibrateResponse,
    CalibrateRow,
    PriorQuery,
    error_responses,
    json_body,
    query_parameters,
)

router = APIRouter(tags=["calibrate"], route_class=DirectRoute)


def parse_rows(body: bytes, num_classes: int, feature_dim: int, max_rows: int) -> RowRequest:
    """A /calibrate JSON body → its rows as float32 arrays and its top-k; 422 with one sentence for any fault."""
    request = CalibrateRequest.model_validate_json(body)
    check_count("rows", len(request.rows), max_rows, "max_rows")
    top_k = resolve_top_k(request.top_k, num_classes)
    return rows_to_request(request.rows, num_classes, feature_dim, top_k)


def rows_to_request(rows: list[CalibrateRow], num_classes: int, feature_dim: int, top_k: int) -> RowRequest:
    """JSON rows → features (N, d), logits (N, K) float32; 422 naming the first row of the wrong length."""
    for i, row in enumerate(rows):
        if len(row.features) != feature_dim:
            raise InputError(f"rows[{i}].features has {len(row.features)} values, expected d={feature_dim}.")
        if len(row.logits) != num_classes:
            raise InputError(f"rows[{i}].logits has {len(row.logits)} values, expected K={num_classes}.")
    features = finite_float32([row.features for row in rows], "rows[].features")  # (N, d)
    logits = finite_float32([row.logits for row in rows], "rows[].logits")  # (N, K)
    return RowRequest(features, logits, top_k)


@router.post("/calibrate", response_model=CalibrateResponse,
             openapi_extra={**json_body(CalibrateRequest), "parameters": query_parameters(PriorQuery)},
             responses=error_responses(413, 415, 422, 503))
async def calibrate(request: Request) -> Response:
    """Calibrate rows of cached stage-1 outputs: ``{"rows": [{"features": [d floats], "logits": [K floats]}], "top_k": 5}``."""
    runtime = await get_runtime(request)  # called, not injected: dependency resolution costs more than the call
    body = await json_bytes(request)
    model = runtime.model
    rows = await off_loop_if_large(len(body), parse_rows, body, model.num_classes, model.feature_dim, runtime.settings.max_rows)
    result = await runtime.calibrate_rows(replace(rows, use_prior=use_served_prior(request.query_params.get("prior")),
                                                  source=traffic_source(request, runtime)))
    finite_or_raise(result.logits, "calibrated logits")
    tops = top_k_lists(result.top_indices, result.top_probabilities, result.calibration.class_names)
    # Written by orjson from the arrays (the schema is still documented by response_model).
    results = [{"logits": z, "probabilities": p, "top_k": t} for z, p, t in zip(result.logits, result.probabilities, tops, strict=True)]
    return await json_response({"model_name": runtime.settings.model_name, "calibration_version": result.calibration.version,
                                "prior_version": result.prior_version, "results": results}, approx_values=2 * result.logits.size)
