"""Baselines of DisAlign on the same estimator contract (one module per family):

- ``joint`` (:class:`Joint`) and ``logit-adjust`` (:class:`LogitAdjustment`): :mod:`calib.baselines.prior`
- ``tau-norm`` (:class:`TauNorm`): :mod:`calib.baselines.tau_norm`
- ``lws`` (:class:`LWS`) and ``crt`` (:class:`CRT`): :mod:`calib.baselines.retrain`
- ``ncm`` (:class:`NCM`): :mod:`calib.baselines.ncm`
- ``tde`` (:class:`TDE`, Deconfound-TDE inference): :mod:`calib.baselines.tde`

On banks with a background column (RoI banks) every baseline leaves the background logit as the stage-1
model gives it, as DisAlign does (:func:`calib.baselines.common.keep_background`).

:data:`BASELINES` maps method names to classes; :data:`calib.methods.METHODS` includes it.
"""

from __future__ import annotations

from calib.baselines.ncm import NCM
from calib.baselines.prior import Joint, LogitAdjustment
from calib.baselines.retrain import CRT, LWS
from calib.baselines.tau_norm import TauNorm
from calib.baselines.tde import TDE
from calib.estimator import Calibrator

BASELINES: dict[str, type[Calibrator]] = {
    cls.method: cls for cls in (Joint, LogitAdjustment, TauNorm, LWS, CRT, NCM, TDE)
}

__all__ = ["BASELINES", "CRT", "LWS", "NCM", "TDE", "Joint", "LogitAdjustment", "TauNorm"]
