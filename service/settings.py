"""Server settings, read from the environment (prefix ``DISALIGN_``) or passed to :func:`disalign.service.main.create_app`.

    DISALIGN_MODEL=/models/model.ts DISALIGN_CALIBRATION=/calibration disalign serve

Paths are fixed here, at start-up, by the operator; no request parameter ever names a server path.
``admin_token`` has no default: while it is unset the ``/admin`` routes answer 403. It can also be read
from a file, ``DISALIGN_ADMIN_TOKEN_FILE`` (a Docker / Kubernetes secret), so that it never shows in the
environment of the process (``docker inspect``). Sizes in bytes accept ``16M``, ``8MiB`` or a plain count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from disalign.calib.defaults import DEFAULT_MAX_PIXELS
from disalign.calib.sizes import parse_bytes

MiB = 1024 * 1024


def _bytes(value: Any) -> Any:
    return parse_bytes(value) if isinstance(value, str) else value


ByteCount = Annotated[int, BeforeValidator(_bytes)]  # 16M, 8MiB, 1.5G or a plain number of bytes


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
    reload_timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="longest a reload may read and check a calibration")
    model_name: str = Field("disalign", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="name in the /v2 routes")
    admin_token: SecretStr | None = Field(None, description="Bearer token of the /admin routes (disabled when unset)")
    admin_token_file: Path | None = Field(None, description="file holding the admin token (a secret), instead of admin_token")
    max_body_bytes: ByteCount = Field(8 * MiB, ge=1024, description="largest request body accepted (413 beyond)")
    max_inflight_body_bytes: ByteCount = Field(64 * MiB, ge=1024, description="bytes of request bodies held at once (503 beyond)")
    timeout_header: float = Field(10.0, gt=0, le=3600, description="seconds for a request line and headers to arrive (408 beyond)")
    timeout_body: float = Field(30.0, gt=0, le=3600, description="seconds for a whole request body to arrive (408 beyond)")
    timeout_keep_alive: float = Field(5.0, gt=0, le=3600, description="seconds an idle kept-alive connection stays open")
    limit_concurrency: int | None = Field(None, ge=1, description="most connections and requests at once (503 beyond); unset: no limit")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest decoded image, width x height (413 beyond)")
    max_images: int = Field(64, ge=1, description="most images in one request")
    max_rows: int = Field(4096, ge=1, description="most rows in one /calibrate or /v2 infer request")
    torch_threads: int = Field(default_factory=default_torch_threads, ge=1, description="torch intra-op threads")
    max_batch: int = Field(32, ge=1, le=4096, description="most images in one forward pass of the micro-batcher")
    # 0 by default: under load a batch is whatever queued while the previous pass ran, and a deliberate
    # wait only synchronises the clients into one batch that leaves the model idle between passes
    # (measured with 32 clients on 2 CPUs: 227 images/s at 0 ms, 167 at 2 ms).
    max_wait_ms: float = Field(0.0, ge=0.0, le=1000.0, description="how long the first image of a batch may wait for others")
    device: str = Field("cpu", description="torch device of the model")
    # Label shift (disalign.service.prior): the class prior the predictions are aligned to, and the adaptive mode's window.
    prior: str = Field("balanced", min_length=1, description="balanced, adaptive (estimated from the traffic) or a prior file (JSON)")
    prior_window: int = Field(5000, ge=10, le=1_000_000, description="adaptive prior: rows of recent traffic kept (x K float32)")
    prior_update_every: int = Field(100, ge=1, description="adaptive prior: requests between two estimates")
    prior_min_rows: int = Field(200, ge=1, description="adaptive prior: rows the window needs before the first estimate")

    @model_validator(mode="before")
    @classmethod
    def _token_from_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("admin_token_file") is None:
            return data
        if data.get("admin_token") is not None:
            raise ValueError("set DISALIGN_ADMIN_TOKEN or DISALIGN_ADMIN_TOKEN_FILE, not both")
        path = Path(data["admin_token_file"])
        if not path.is_file():  # a FIFO or a directory would block or fail the read
            raise ValueError(f"DISALIGN_ADMIN_TOKEN_FILE {path} is not a regular file")
        try:
            token = path.read_text().strip()  # the newline an editor or `echo` adds is not part of the token
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"DISALIGN_ADMIN_TOKEN_FILE {path} cannot be read ({exc})") from None
        return {**data, "admin_token": token}

    @field_validator("admin_token")
    @classmethod
    def _no_empty_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("the admin token should have at least 16 characters; leave it unset to disable the admin routes")
        return value

    @model_validator(mode="after")
    def _budget_holds_one_body(self) -> Settings:
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(f"--max-inflight-body-bytes / DISALIGN_MAX_INFLIGHT_BODY_BYTES ({self.max_inflight_body_bytes}) should be "
                             f"at least --max-body-bytes / DISALIGN_MAX_BODY_BYTES ({self.max_body_bytes}), or no body of "
                             "the largest size could ever be received")
        return self
