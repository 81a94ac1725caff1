"""Assembles the FastAPI app; nothing is loaded at import.

    app = create_app(Settings(model="model.ts", card="model.json", calibration="calib_dir"))

The lifespan loads the model and the calibration on the inference thread, refuses to start with one
sentence when they do not fit (K, d, model fingerprint, preprocessing) or the artifact is invalid, runs
one warm-up forward pass, starts the micro-batchers and the calibration directory watcher, and only
then marks the app ready.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from disalign.calib import __version__
from disalign.calib.artifact.publish import current_version
from disalign.calib.errors import DisalignError
from disalign.service.dense import make_runtime
from disalign.service.errors import install_error_handlers
from disalign.service.limits import BodyLimitMiddleware
from disalign.service.metrics import MetricsMiddleware, ServiceMetrics
from disalign.service.reloader import CalibrationReloader
from disalign.service.routers import admin, calibrate, health, metrics, predict, prior, v2
from disalign.service.settings import Settings

log = logging.getLogger("service")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    torch.set_num_threads(settings.torch_threads)  # here and again on the inference thread (Runtime.load)
    runtime = make_runtime(settings, app.state.metrics)  # the card's task: classification, segmentation or detection
    reloader = app.state.reloader = CalibrationReloader(runtime)
    reloader.seen = current_version(settings.calibration)  # before reading it: a version published meanwhile is a change
    try:
        await runtime.batcher.run_in_thread(runtime.load)
        await runtime.batcher.run_in_thread(runtime.warm_up)
    except Exception as exc:
        # A DisalignError is the one-sentence refusal; anything else (a bug) is still reported in one line.
        app.state.startup_error = str(exc) if isinstance(exc, DisalignError) else f"{type(exc).__name__}: {exc}"
        runtime.batcher.executor.shutdown(wait=False)
        runtime.row_batcher.executor.shutdown(wait=False)
        raise
    await runtime.batcher.start()
    await runtime.row_batcher.start()
    # The ~200k objects of torch, numpy and the model live as long as the process: moved out of the
    # collector's reach, a full collection no longer walks them (≈0.1 s each, a latency spike under load).
    gc.collect()
    gc.freeze()
    runtime.ready = True
    app.state.runtime = runtime
    watcher = asyncio.create_task(reloader.watch(settings.watch_interval_s)) if settings.watch_interval_s > 0 else None
    try:
        yield
    finally:
        runtime.ready = False
        if watcher is not None:
            watcher.cancel()
        runtime.prior.stop()
        await runtime.batcher.stop()
        await runtime.row_batcher.stop()


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="disalign",
        version=__version__,
        summary="Post-hoc DisAlign calibration of a long-tail classifier, served over REST (Open Inference Protocol v2).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.runtime = None
    app.state.startup_error = None
    routers = [module.router for module in (health, calibrate, v2, predict, admin, prior, metrics)]
    for router in routers:  # matched in this order: the busy routes first
        app.include_router(router)
    install_error_handlers(app, routers)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_inflight_body_bytes=settings.max_inflight_body_bytes, timeout_body=settings.timeout_body)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: counts 413s too
    return app


class QuietStartupErrors:
    """ASGI wrapper for uvicorn: a DisalignError at start-up is logged as its sentence, not a traceback."""

    def __init__(self, app: FastAPI):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def quiet_send(message: Message) -> None:
            sentence = self.app.state.startup_error
            if message["type"] == "lifespan.startup.failed" and sentence:
                message = {**message, "message": f"refusing to start: {sentence}"}
            await send(message)

        try:
            await self.app(scope, receive, quiet_send)
        except Exception:
            if not self.app.state.startup_error:
                raise
            # already reported in one line through lifespan.startup.failed
