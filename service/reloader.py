"""Swapping in a new calibration: one validated path for ``POST /admin/reload`` and for the directory watcher.

A reload reads the current version of the calibration directory and checks it completely off the event
loop — typed metadata, tensors, the canary (:mod:`disalign.calib.artifact.format`), K, d, the model fingerprint and the
preprocessing against the served model (:func:`disalign.service.runtime.check_calibration`). Only then comes the
swap, the last step and one that cannot fail: the runtime's calibration reference, ``/metrics`` and the
``/v2`` metadata change together, with no ``await`` in between. On any failure the old calibration keeps
serving and ``disalign_calibration_reloads_total{outcome}`` counts it (``unreadable`` or ``incompatible``).

No reload holds the reload path for longer than ``reload_timeout_s``: a read that takes longer (a hung network
mount; FIFOs and devices are refused at once by the artifact reader) is abandoned — its result, should it come,
is dropped — the old calibration keeps serving, and the next publish is read as usual.

The same loop follows the deployment's published class prior (``DIR/prior/published/current``, adaptive mode).

Several replicas on one directory: each polls ``DIR/current`` every ``watch_interval_s`` (one readlink,
:func:`disalign.calib.artifact.publish.current_version`) and reloads when it points elsewhere, so all of them serve a newly
published version within about one interval. A new version that fails the checks is logged and counted
once; the replica keeps serving the old one and tries again only when another version is published.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.concurrency import run_in_threadpool

from disalign.calib.artifact.publish import current_version
from disalign.calib.errors import ArtifactError, DisalignError
from disalign.service.runtime import IncompatibleCalibration, Runtime
from disalign.service.state import CalibrationState

log = logging.getLogger("service")


class ReloadTimeout(ArtifactError):
    """Reading and checking the calibration took longer than ``reload_timeout_s`` (503)."""


class CalibrationReloader:
    """Serialises reloads of one runtime and watches its calibration directory."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.lock = asyncio.Lock()
        # What the directory pointed to when the served calibration was read; read *before* each read, so a
        # version published while reading is seen as a change afterwards and never missed.
        self.seen: str | None = None

    async def reload(self) -> tuple[CalibrationState, CalibrationState]:
        """Read, check and swap in the current version; returns ``(previous, new)`` or raises a one-sentence ArtifactError."""
        runtime, metrics = self.runtime, self.runtime.metrics
        async with self.lock:
            previous = runtime.calibration
            self.seen = await run_in_threadpool(current_version, runtime.settings.calibration)
            timeout = runtime.settings.reload_timeout_s
            try:
                state = await asyncio.wait_for(run_in_threadpool(runtime.read_checked_calibration), timeout)
            except TimeoutError:
                metrics.reloads.labels("timeout").inc()
                raise ReloadTimeout(f"reading and checking the calibration in {runtime.settings.calibration} took longer than "
                                    f"{timeout:g} s (DISALIGN_RELOAD_TIMEOUT_S); still serving {previous.version}.") from None
            except IncompatibleCalibration:
                metrics.reloads.labels("incompatible").inc()
                raise
            except ArtifactError:
                metrics.reloads.labels("unreadable").inc()
                raise
            runtime.swap_calibration(state)
            metrics.reloads.labels("ok").inc()
        return previous, state

    async def watch(self, interval_s: float) -> None:
        """Poll the calibration directory every ``interval_s`` seconds and reload a newly published version; and
        serve a newly published prior (adaptive mode: :meth:`disalign.service.prior.PriorTracker.follow`)."""
        directory = self.runtime.settings.calibration
        while True:
            await asyncio.sleep(interval_s)
            try:
                await run_in_threadpool(self.runtime.prior.follow)
            except Exception:  # a bug: keep watching, and keep serving the prior served now
                log.exception("following the prior published in %s failed", directory)
            pointer = await run_in_threadpool(current_version, directory)
            if pointer is None or pointer == self.seen:
                continue
            try:
                previous, state = await self.reload()
            except DisalignError as exc:
                log.warning("a new calibration was published in %s but is not served: %s", directory, exc)
                continue
            except Exception:  # a bug: keep watching, and keep serving the old calibration
                log.exception("reloading the calibration published in %s failed", directory)
                continue
            if state.version != previous.version:
                log.info("serving calibration %s (published in %s; was %s)", state.version, directory, previous.version)
