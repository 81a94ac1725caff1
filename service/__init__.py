"""disalign.service — serve a stage-1 model with its DisAlign calibration over REST (FastAPI).

Layout: :mod:`disalign.service.main` assembles the app from one router per area (:mod:`disalign.service.routers`);
:mod:`disalign.service.schemas` holds the request/response bodies, :mod:`disalign.service.runtime` the domain objects
(model, inference; the calibration snapshot is :mod:`disalign.service.state`), :mod:`disalign.service.wire_v2`
the Open Inference Protocol v2 wire format, :mod:`disalign.service.prior` the served class prior,
:mod:`disalign.service.batcher` the micro-batcher,
:mod:`disalign.service.settings` the ``DISALIGN_*`` settings, :mod:`disalign.cli.serve` the ``serve`` command.
Spec and examples: ``docs/service.md``.
"""
