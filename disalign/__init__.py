"""disalign — post-hoc distribution alignment (DisAlign, Zhang et al. CVPR 2021) of long-tail classifiers.

One import name. The repository's folders ``calib/``, ``feature_extract/`` and ``service/`` install as
:mod:`disalign.calib`, :mod:`disalign.feature_extract` and :mod:`disalign.service`; this package holds the
public Python API and the ``disalign`` command line (:mod:`disalign.cli`)::

    import disalign

    est = disalign.DisAlign(rho="auto").fit("train.h5", val="val.h5")
    probabilities = est.predict_proba(features, logits)   # numpy arrays or torch tensors
    est.save("calib/")
    est = disalign.load_calibration("calib/")

The names below are imported from their home module on first use, so ``import disalign`` (and the
command line's ``--help``) stays fast and imports no torch until an estimator is needed.

Floors, top to bottom (a module imports only from its own floor, without a circle, and the floors below;
``tests/disalign/test_layers.py`` reads this list and checks every import):

    disalign                    this API (names re-exported lazily) and ``python -m disalign``
    disalign.cli                the command line: one parser tree, one module per command
    disalign.service            the REST server (FastAPI); HTTP only at its edge
    disalign.feature_extract    images + a frozen model -> feature banks
    disalign.calib.evaluation   tables, bootstrap intervals, plots, dense (mIoU, AP) evaluation
    disalign.calib.estimators   DisAlign and the baselines on one estimator contract; the method list
    disalign.calib.artifact     the calibration artifact: its one typed format, atomic publishing
    disalign.calib.core         the math over tensors: head, GRW, training, metrics, label shift
    disalign.calib.data         feature banks, predictions files, dense annotations (masks, COCO)
    disalign.calib              errors, defaults, atomic files and fingerprints, progress bars
"""

from __future__ import annotations

import importlib

from disalign.calib import __version__

# public name -> the module that defines it
_EXPORTS = {
    # estimators
    "Calibrator": "disalign.calib.estimators.base",
    "DisAlign": "disalign.calib.estimators.disalign",
    "Joint": "disalign.calib.estimators.baselines",
    "LogitAdjustment": "disalign.calib.estimators.baselines",
    "TauNorm": "disalign.calib.estimators.baselines",
    "LWS": "disalign.calib.estimators.baselines",
    "CRT": "disalign.calib.estimators.baselines",
    "NCM": "disalign.calib.estimators.baselines",
    "TDE": "disalign.calib.estimators.baselines",
    "METHODS": "disalign.calib.estimators.methods",
    "method_class": "disalign.calib.estimators.methods",
    "load_calibration": "disalign.calib.estimators.methods",
    # feature banks
    "Bank": "disalign.calib.data.bank",
    "BankInfo": "disalign.calib.data.bank",
    "BankReader": "disalign.calib.data.bank",
    "BankWriter": "disalign.calib.data.bank",
    "open_bank": "disalign.calib.data.bank",
    "load_bank": "disalign.calib.data.bank",
    "write_bank": "disalign.calib.data.bank",
    # evaluation
    "evaluate_methods": "disalign.calib.evaluation.evaluate",
    "fit_baselines": "disalign.calib.evaluation.evaluate",
    "format_table": "disalign.calib.evaluation.evaluate",
    "write_plots": "disalign.calib.evaluation.plots",
    # errors
    "DisalignError": "disalign.calib.errors",
    "BankError": "disalign.calib.errors",
    "ArtifactError": "disalign.calib.errors",
    "InputError": "disalign.calib.errors",
    "NotFittedError": "disalign.calib.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'disalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
