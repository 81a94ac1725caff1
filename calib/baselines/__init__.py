"""Baselines of DisAlign on the same estimator contract (one module per family):

- ``joint`` (:class:`Joint`) and ``logit-adjust`` (:class:`LogitAdjustment`): :mod:`calib.baselines.prior`
- ``tau-norm`` (:class:`TauNorm`): :mod:`calib.baselines.tau_norm`
- ``lws`` (:class:`LWS`) and ``crt`` (:class:`CRT`): :mod:`calib.baselines.retrain`
- ``ncm`` (:class:`NCM`): :mod:`calib.baselines.ncm`

:data:`BASELINES` maps method names to classes; :data:`calib.methods.METHODS` includes it.
"""

from __future__ import annotations

from calib.baselines.ncm import NCM
from calib.baselines.prior import Joint, LogitAdjustment
from calib.baselines.retrain import CRT, LWS
from calib.baselines.tau_norm import TauNorm
from calib.estimator import Calibrator

BASELINES: dict[str, type[Calibrator]] = {
    cls.method: cls for cls in (Joint, LogitAdjustment, TauNorm, LWS, CRT, NCM)
}

__all__ = ["BASELINES", "CRT", "LWS", "NCM", "Joint", "LogitAdjustment", "TauNorm"]
