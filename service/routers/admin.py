"""``POST /admin/reload`` (Bearer token): re-read the calibration directory and swap it in atomically.

The reload goes through :class:`disalign.service.reloader.CalibrationReloader`, the same path the directory
watcher uses: the current version is read and checked completely off the event loop (typed metadata,
tensors, a canary, K, d, fingerprint and preprocessing against the served model), and the swap is the
last step. On failure the old calibration keeps serving and the answer says why: 422 for an unreadable
or invalid artifact, 409 for one that does not fit the model.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from disalign.service.deps import AdminDep, RuntimeDep
from disalign.service.reloader import CalibrationReloader
from disalign.service.schemas import ReloadResponse, error_responses

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.post("/reload", response_model=ReloadResponse, responses=error_responses(401, 403, 409, 422, 503))
async def reload(request: Request, runtime: RuntimeDep) -> ReloadResponse:
    """Load the calibration again from the configured directory (no path can be given)."""
    reloader: CalibrationReloader = request.app.state.reloader
    previous, state = await reloader.reload()
    return ReloadResponse(calibration_version=state.version, previous_version=previous.version,
                          changed=state.version != previous.version)
