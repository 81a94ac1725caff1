"""Prometheus metrics of one app, in its own :class:`CollectorRegistry` (several apps in one test process never clash).

- ``disalign_requests_total{route,method,code}`` and ``disalign_request_duration_seconds{route,method}``,
  labelled with the route *template* (``/v2/models/{name}/infer``), never the raw path;
- ``disalign_batch_size``: images per forward pass of the micro-batcher;
- ``disalign_calibration_reloads_total{outcome}``;
- ``disalign_model_info`` and ``disalign_calibration_info``: model fingerprint, calibration version;
- ``disalign_prior_*``: the served class prior and its estimate from the traffic (:class:`PriorMetrics`, set by
  :class:`disalign.service.prior.PriorTracker`).
- the standard collectors: ``process_*`` (CPU, resident memory, open files, start time), ``python_info``
  and ``python_gc_*``.

No ``*_created`` series: they double the series count and no dashboard here uses them (filtered at
exposition, per registry, rather than with the library's process-wide switch).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from disalign.feature_extract.models import LoadedModel
    from disalign.service.state import CalibrationState

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class PriorMetrics:
    """The ``disalign_prior_*`` metrics, in the app's registry."""

    def __init__(self, registry: CollectorRegistry):
        self.info = Info("disalign_prior", "The class prior served: mode, version, source, frozen, published version.", registry=registry)
        self.rows = Counter("disalign_prior_rows", "Rows answered, by the trusted traffic source that sent them ('untrusted': "
                            "counted towards no estimate).", ("source",), registry=registry)
        self.distance = Gauge("disalign_prior_distance", "L1 distance of the latest estimated prior from a reference prior "
                              "(uniform or the training prior; 0 before any estimate).", ("reference",), registry=registry)
        self.window_rows = Gauge("disalign_prior_window_rows", "Rows of trusted traffic in this replica's windows.", registry=registry)
        self.last_update = Gauge("disalign_prior_last_update_timestamp_seconds", "Unix time of the latest prior estimate.",
                                 registry=registry)
        self.p_value = Gauge("disalign_prior_test_p_value", "p-value of this replica's latest estimate's test against the "
                             "prior served (published when below 0.01).", registry=registry)
        self.estimates = Counter("disalign_prior_estimates", "This replica's prior estimates by outcome: publish (a new "
                                 "version), keep (the checks kept the current one), error.", ("decision",), registry=registry)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("disalign_requests", "HTTP requests by route template, method and status code.",
                                ("route", "method", "code"), registry=r)
        self.latency = Histogram("disalign_request_duration_seconds", "HTTP request latency by route template.",
                                 ("route", "method"), buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("disalign_batch_size", "Images per forward pass of the micro-batcher.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.reloads = Counter("disalign_calibration_reloads", "Calibration reloads by outcome.", ("outcome",), registry=r)
        self.model_info = Info("disalign_model", "The served stage-1 model.", registry=r)
        self.calibration_info = Info("disalign_calibration", "The calibration currently served.", registry=r)
        self.prior = PriorMetrics(r)  # disalign_prior_*, set by disalign.service.prior
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def collect(self) -> Iterator[Metric]:
        """The registry's metrics without their ``*_created`` samples (give this object to ``generate_latest``)."""
        for metric in self.registry.collect():
            metric.samples = [sample for sample in metric.samples if not sample.name.endswith("_created")]
            yield metric

    def set_model(self, name: str, model: LoadedModel) -> None:
        self.model_info.info({"name": name, "kind": model.kind, "fingerprint": model.fingerprint,
                              "num_classes": str(model.num_classes), "feature_dim": str(model.feature_dim)})

    def set_calibration(self, state: CalibrationState) -> None:
        self.calibration_info.info({"version": state.version, "method": state.meta.method, "created": state.meta.created})


class MetricsMiddleware:
    """Pure ASGI middleware counting every HTTP request and timing it, errors included."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - start)
