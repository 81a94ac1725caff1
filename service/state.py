"""The calibration a server serves: one immutable :class:`CalibrationState`, shared by the runtime, the metrics and the prior.

Its own module, importing none of them, so that each of those can name the state without importing the
others (the runtime owns the metrics and the prior; the metrics and the prior only read the state).
"""

from __future__ import annotations

from dataclasses import dataclass

from disalign.calib.estimators.base import CalibrationMeta, Calibrator


@dataclass(frozen=True)
class CalibrationState:
    """One loaded calibration and its version; never mutated (a reload makes a new one)."""

    calibrator: Calibrator
    version: str

    @property
    def meta(self) -> CalibrationMeta:
        return self.calibrator.meta_

    @property
    def class_names(self) -> list[str]:
        return self.calibrator.meta_.class_names
