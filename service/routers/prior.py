"""``GET /admin/prior`` and ``POST /admin/prior`` (Bearer token, like ``/admin/reload``): the served class prior.

    curl -H "Authorization: Bearer $TOKEN" -d '{"action": "freeze"}' http://127.0.0.1:8000/admin/prior
    curl -H "Authorization: Bearer $TOKEN" -d '{"action": "set", "prior": [0.5, 0.3, 0.2]}' http://127.0.0.1:8000/admin/prior

Actions: ``freeze`` (keep the current prior; the trusted windows still fill), ``unfreeze``, ``reset``
(empty windows, no estimate, back to balanced or the prior file) and ``set`` (serve the given K numbers,
normalised, frozen). With ``DISALIGN_PRIOR=adaptive`` each is published as a prior version, so every replica
follows it (a reset starts a new epoch: no replica's earlier traffic counts again); in the other modes it
changes this process only. Both routes answer the status (:meth:`disalign.service.prior.PriorTracker.status`).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from disalign.calib.errors import InputError
from disalign.service.deps import AdminDep, RuntimeDep
from disalign.service.schemas import error_responses

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


class PriorCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["freeze", "unfreeze", "reset", "set"]
    prior: list[float] | None = Field(None, max_length=100_000, description="with 'set': K numbers >= 0 (normalised)")


class PriorEstimateStatus(BaseModel):
    prior: list[float]
    statistic: float = Field(description="likelihood-ratio statistic against the balanced reference")
    p_value: float
    adapt: bool = Field(description="whether the test rejected the balanced reference")
    rows: int = Field(description="trusted rows pooled from every replica, each source capped at its max_share")
    time: float = Field(description="Unix time of the estimate")
    rows_by_source: dict[str, int]
    published: bool = Field(description="whether it passed the checks and was published as a new version")
    reason: str


class PublishedPriorStatus(BaseModel):
    pointer: str = Field(description="versions/<id> in the prior directory")
    source: str = Field(description="estimate, adapt or admin")
    created: str
    calibration_version: str = Field(description="the calibration it applies to (another one is served balanced)")
    epoch: str
    rows: int
    rows_by_source: dict[str, int]
    frozen: bool


class PriorStatus(BaseModel):
    mode: Literal["balanced", "adaptive", "file"]
    version: str = Field(description="what responses name as prior_version")
    source: str = Field(description="balanced, estimate, file or admin")
    frozen: bool
    prior: list[float] | None = Field(description="the prior served (None: balanced)")
    window_rows: int = Field(description="trusted rows in this replica's windows")
    window_capacity: int
    sources: dict[str, int] = Field(description="trusted rows in this replica's windows, by source")
    estimate: PriorEstimateStatus | None = Field(description="the latest estimate this replica made")
    published: PublishedPriorStatus | None = Field(description="the deployment's published prior (adaptive mode)")


@router.get("/prior", response_model=PriorStatus, responses=error_responses(401, 403, 503))
async def prior_status(runtime: RuntimeDep) -> PriorStatus:
    """The served class prior, the adaptive window and the latest estimate."""
    return PriorStatus(**runtime.prior.status())


@router.post("/prior", response_model=PriorStatus, responses=error_responses(400, 401, 403, 422, 503))
async def prior_command(command: PriorCommand, runtime: RuntimeDep) -> PriorStatus:
    """Freeze, unfreeze, reset or set the served class prior."""
    tracker = runtime.prior
    if (command.prior is not None) != (command.action == "set"):
        raise InputError("prior should be given with action 'set' and only with it.")
    if command.action == "set":
        tracker.set_prior(command.prior)
    elif command.action == "reset":
        tracker.reset()
    else:
        tracker.freeze(command.action == "freeze")
    return PriorStatus(**tracker.status())
