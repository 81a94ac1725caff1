"""Baselines of DisAlign on the same estimator contract (one module per family):

- ``joint`` (:class:`Joint`) and ``logit-adjust`` (:class:`LogitAdjustment`): :mod:`disalign.calib.estimators.baselines.prior`
- ``tau-norm`` (:class:`TauNorm`): :mod:`disalign.calib.estimators.baselines.tau_norm`
- ``lws`` (:class:`LWS`) and ``crt`` (:class:`CRT`): :mod:`disalign.calib.estimators.baselines.retrain`
- ``ncm`` (:class:`NCM`): :mod:`disalign.calib.estimators.baselines.ncm`
- ``tde`` (:class:`TDE`, Deconfound-TDE inference): :mod:`disalign.calib.estimators.baselines.tde`

On banks with a background column (RoI banks) every baseline leaves the background logit as the stage-1
model gives it, as DisAlign does (:func:`disalign.calib.estimators.baselines.common.keep_background`).

The names of every method, baselines included, are :data:`disalign.calib.estimators.methods.METHODS`.
"""

from __future__ import annotations

from disalign.calib.estimators.baselines.ncm import NCM
from disalign.calib.estimators.baselines.prior import Joint, LogitAdjustment
from disalign.calib.estimators.baselines.retrain import CRT, LWS
from disalign.calib.estimators.baselines.tau_norm import TauNorm
from disalign.calib.estimators.baselines.tde import TDE

__all__ = ["CRT", "LWS", "NCM", "TDE", "Joint", "LogitAdjustment", "TauNorm"]
