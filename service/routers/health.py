"""Liveness and readiness (Open Inference Protocol ``/v2/health/*``), wired into the Docker healthcheck.

Both also answer ``HEAD`` (load balancers probe with it): the same status, no body. The ``HEAD`` routes stay
out of the OpenAPI schema, which documents one operation per path.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from disalign.service.schemas import Live, Ready, error_responses

router = APIRouter(prefix="/v2/health", tags=["health"])


@router.get("/live", response_model=Live)
async def live() -> Live:
    """200 while the process serves HTTP."""
    return Live(live=True)


@router.get("/ready", response_model=Ready, responses=error_responses(503))
async def ready(request: Request) -> Ready:
    """200 once the model and the calibration are loaded and warmed up; 503 before and while shutting down."""
    runtime = request.app.state.runtime
    if runtime is None or not runtime.ready or not runtime.batcher.running or not runtime.row_batcher.running:
        raise HTTPException(503, "the model is not loaded yet.")
    return Ready(ready=True)


router.add_api_route("/live", live, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/ready", ready, methods=["HEAD"], include_in_schema=False)
