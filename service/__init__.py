"""disalign.service — serve a stage-1 model with its DisAlign calibration over REST (FastAPI).

Layout: :mod:`service.main` assembles the app from one router per area (:mod:`service.routers`);
:mod:`service.schemas` holds the request/response bodies, :mod:`service.runtime` the domain objects
(model, calibration snapshot, inference), :mod:`service.batcher` the micro-batcher,
:mod:`service.settings` the ``DISALIGN_*`` settings, :mod:`service.cli` the ``serve`` command.
Spec and examples: ``docs/service.md``.
"""
