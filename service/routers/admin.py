"""``POST /admin/reload`` (Bearer token): re-read the calibration directory and swap it in atomically.

The new artifact is loaded and checked against the served model off the event loop; only if both pass
does the runtime's calibration reference change (one assignment, so every request or batch sees either
the old or the new calibration, never a mix). On failure the old calibration keeps serving and the
answer says why: 422 for an unreadable artifact, 409 for one that does not fit the model.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from calib.errors import ArtifactError
from service.deps import AdminDep, RuntimeDep
from service.runtime import (
    CalibrationState,
    IncompatibleCalibration,
    Runtime,
    check_calibration,
    read_calibration,
)
from service.schemas import ReloadResponse, error_responses

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


def _load_checked(runtime: Runtime) -> CalibrationState:
    return check_calibration(read_calibration(runtime.settings.calibration), runtime.model, runtime.settings.model_name)


@router.post("/reload", response_model=ReloadResponse, responses=error_responses(401, 403, 409, 422, 503))
async def reload(request: Request, runtime: RuntimeDep) -> ReloadResponse:
    """Load the calibration again from the configured directory (no path can be given)."""
    lock: asyncio.Lock = request.app.state.reload_lock
    metrics = runtime.metrics
    async with lock:
        previous = runtime.calibration
        try:
            state = await run_in_threadpool(_load_checked, runtime)
        except IncompatibleCalibration:
            metrics.reloads.labels("incompatible").inc()
            raise
        except ArtifactError:
            metrics.reloads.labels("unreadable").inc()
            raise
        runtime.calibration = state
        metrics.set_calibration(state)
        metrics.reloads.labels("ok").inc()
    return ReloadResponse(calibration_version=state.version, previous_version=previous.version,
                          changed=state.version != previous.version)
