"""Request dependencies as ``Annotated`` aliases: the ready runtime, the served model name, the admin token.

All are ``async def``: they do no I/O, and FastAPI would run plain ``def`` dependencies on a worker thread.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from disalign.service.runtime import Runtime
from disalign.service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_runtime(request: Request) -> Runtime:
    """The runtime, once the model and the calibration are loaded and warmed up; 503 before."""
    runtime: Runtime | None = request.app.state.runtime
    if runtime is None or not runtime.ready:
        raise HTTPException(503, "the model is not loaded yet; retry when /v2/health/ready answers 200.")
    return runtime


async def check_model_name(name: Annotated[str, Path(max_length=128)], settings: Annotated[Settings, Depends(get_settings)]) -> str:
    if name != settings.model_name:
        raise HTTPException(404, f"model '{name}' is not served here; this server serves '{settings.model_name}'.")
    return name


_bearer = HTTPBearer(auto_error=False, description="the DISALIGN_ADMIN_TOKEN of the server")


async def require_admin(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """403 while no admin token is configured; 401 without the right Bearer token (constant-time compare)."""
    if settings.admin_token is None:
        raise HTTPException(403, "the admin routes are disabled; set DISALIGN_ADMIN_TOKEN to enable them.")
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(401, "this route needs an 'Authorization: Bearer <token>' header.", headers=challenge)
    expected = settings.admin_token.get_secret_value().encode()
    if not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise HTTPException(401, "the admin token is wrong.", headers=challenge)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ModelName = Annotated[str, Depends(check_model_name)]
AdminDep = Depends(require_admin)
