"""Server settings, read from the environment (prefix ``DISALIGN_``) or passed to :func:`disalign.service.main.create_app`.

    DISALIGN_MODEL=/models/model.ts DISALIGN_CALIBRATION=/calibration disalign serve

Paths are fixed here, at start-up, by the operator; no request parameter ever names a server path.
``admin_token`` has no default: while it is unset the ``/admin`` routes answer 403. It can also be read
from a file, ``DISALIGN_ADMIN_TOKEN_FILE`` (a Docker / Kubernetes secret), so that it never shows in the
environment of the process (``docker inspect``). Sizes in bytes accept ``16M``, ``8MiB`` or a plain count.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from disalign.calib.defaults import DEFAULT_MAX_PIXELS, PRIOR_MAX_STEP
from disalign.calib.sizes import parse_bytes

MiB = 1024 * 1024


def _bytes(value: Any) -> Any:
    return parse_bytes(value) if isinstance(value, str) else value


ByteCount = Annotated[int, BeforeValidator(_bytes)]  # 16M, 8MiB, 1.5G or a plain number of bytes


SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # as disalign.calib.artifact.priors.SOURCE_NAME


class TrafficSource(BaseModel):
    """One source of trusted traffic (``DISALIGN_PRIOR_SOURCES``): its token and its largest share of an estimate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr = Field(description="sent by the source (its gateway) in the Disalign-Traffic-Token header; >= 16 characters")
    max_share: float = Field(1.0, gt=0.0, le=1.0, description="largest share of the rows of any estimate this source may hold")


def _sources(value: Any) -> Any:
    """``{"name": "token"}`` is ``{"name": {"token": "token"}}``; a JSON string (the environment) is parsed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"should be JSON: {{\"<source>\": {{\"token\": …, \"max_share\": 0.5}}}} ({exc})") from None
    if isinstance(value, dict):
        return {name: {"token": spec} if isinstance(spec, str) else spec for name, spec in value.items()}
    return value


Sources = Annotated[dict[str, TrafficSource], BeforeValidator(_sources)]


def default_torch_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Settings(BaseSettings):
    """Everything the server needs to start; validated once, here."""

    model_config = SettingsConfigDict(env_prefix="DISALIGN_", env_ignore_empty=True, extra="ignore", frozen=True)

    model: str = Field(description="stage-1 model: a TorchScript file or any spec feature_extract.load_model accepts")
    weights: str | None = Field(None, description="weights file for model specs that need one")
    model_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model's builder (JSON object), as extract's --model-arg")
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
    # Who may move the adaptive prior (disalign.service.traffic), how far one estimate may move it, and where the
    # deployment's prior is published (disalign.calib.artifact.priors); docs/service.md, "Threat model".
    prior_sources: Sources = Field(default_factory=dict, description="trusted traffic sources: name -> token and max_share")
    prior_sources_file: Path | None = Field(None, description="a JSON file holding prior_sources instead (a secret)")
    prior_max_step: float = Field(PRIOR_MAX_STEP, gt=0.0, le=2.0, description="adaptive prior: largest L1 move of one published estimate")
    prior_dir: Path | None = Field(None, description="where the deployment's prior is published (default: <calibration>/prior)")
    prior_traffic_max_age_s: float = Field(600.0, gt=0.0, description="a replica's window older than this is not pooled")

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

    @model_validator(mode="before")
    @classmethod
    def _sources_from_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("prior_sources_file") is None:
            return data
        if data.get("prior_sources"):
            raise ValueError("set DISALIGN_PRIOR_SOURCES or DISALIGN_PRIOR_SOURCES_FILE, not both")
        path = Path(data["prior_sources_file"])
        if not path.is_file():
            raise ValueError(f"DISALIGN_PRIOR_SOURCES_FILE {path} is not a regular file")
        try:
            return {**data, "prior_sources": path.read_text()}
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"DISALIGN_PRIOR_SOURCES_FILE {path} cannot be read ({exc})") from None

    @field_validator("prior_sources")
    @classmethod
    def _sound_sources(cls, value: dict[str, TrafficSource]) -> dict[str, TrafficSource]:
        tokens = set()
        for name, source in value.items():
            if not SOURCE_NAME.fullmatch(name):
                raise ValueError(f"source name {name!r:.70} should be letters, digits, '.', '_' or '-' (at most 64)")
            token = source.token.get_secret_value()
            if len(token) < 16:
                raise ValueError(f"the token of source {name!r} should have at least 16 characters")
            if token in tokens:
                raise ValueError(f"source {name!r} has the token of another source; each source needs its own")
            tokens.add(token)
        return value

    @field_validator("admin_token")
    @classmethod
    def _no_empty_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("the admin token should have at least 16 characters; leave it unset to disable the admin routes")
        return value

    @model_validator(mode="after")
    def _sources_need_the_adaptive_prior(self) -> Settings:
        if self.prior_sources and self.prior != "adaptive":
            raise ValueError("DISALIGN_PRIOR_SOURCES only applies with DISALIGN_PRIOR=adaptive (it names the traffic "
                             f"that may move the adaptive prior), found DISALIGN_PRIOR={self.prior}")
        admin = self.admin_token.get_secret_value() if self.admin_token else None
        if admin is not None and any(s.token.get_secret_value() == admin for s in self.prior_sources.values()):
            raise ValueError("a traffic source's token is the admin token; give each its own")
        return self

    @model_validator(mode="after")
    def _budget_holds_one_body(self) -> Settings:
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(f"--max-inflight-body-bytes / DISALIGN_MAX_INFLIGHT_BODY_BYTES ({self.max_inflight_body_bytes}) should be "
                             f"at least --max-body-bytes / DISALIGN_MAX_BODY_BYTES ({self.max_body_bytes}), or no body of "
                             "the largest size could ever be received")
        return self
