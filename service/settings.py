"""Server settings, read from the environment (prefix ``DISALIGN_``) or passed to :func:`service.main.create_app`.

    DISALIGN_MODEL=/models/model.ts DISALIGN_CALIBRATION=/calibration disalign serve

Paths are fixed here, at start-up, by the operator; no request parameter ever names a server path.
``admin_token`` has no default: while it is unset the ``/admin`` routes answer 403.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


def default_torch_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Settings(BaseSettings):
    """Everything the server needs to start; validated once, here."""

    model_config = SettingsConfigDict(env_prefix="DISALIGN_", env_ignore_empty=True, extra="ignore", frozen=True)

    model: str = Field(description="stage-1 model: a TorchScript file or any spec feature_extract.load_model accepts")
    weights: str | None = Field(None, description="weights file for model specs that need one")
    classifier_layer: str | None = Field(None, description="name of the final linear layer, when it cannot be found")
    card: Path | None = Field(None, description="model card (JSON) with the preprocessing; without: the calibration's banks' own")
    preprocessing: Literal["imagenet"] | None = Field(None, description="named preprocessing instead of a card (must agree with the calibration's)")
    calibration: Path = Field(description="calibration directory; /admin/reload and the watcher re-read it")
    # Each replica polls DIR/current (one readlink) and reloads a newly published version by itself.
    watch_interval_s: float = Field(1.0, ge=0.0, le=3600.0, description="seconds between checks for a newly published calibration (0: never)")
    model_name: str = Field("disalign", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="name in the /v2 routes")
    admin_token: SecretStr | None = Field(None, description="Bearer token of the /admin routes (disabled when unset)")
    max_body_bytes: int = Field(8 * MiB, ge=1024, description="largest request body accepted (413 beyond)")
    max_pixels: int = Field(25_000_000, ge=1, description="largest decoded image, width x height (413 beyond)")
    max_images: int = Field(64, ge=1, description="most images in one request")
    max_rows: int = Field(4096, ge=1, description="most rows in one /calibrate or /v2 infer request")
    torch_threads: int = Field(default_factory=default_torch_threads, ge=1, description="torch intra-op threads")
    max_batch: int = Field(32, ge=1, le=4096, description="most images in one forward pass of the micro-batcher")
    # 0 by default: under load a batch is whatever queued while the previous pass ran, and a deliberate
    # wait only synchronises the clients into one batch that leaves the model idle between passes
    # (measured with 32 clients on 2 CPUs: 227 images/s at 0 ms, 167 at 2 ms).
    max_wait_ms: float = Field(0.0, ge=0.0, le=1000.0, description="how long the first image of a batch may wait for others")
    device: str = Field("cpu", description="torch device of the model")

    @field_validator("admin_token")
    @classmethod
    def _no_empty_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("admin_token should have at least 16 characters; leave it unset to disable the admin routes")
        return value
