"""disalign — post-hoc distribution alignment (DisAlign, Zhang et al. CVPR 2021) of long-tail classifiers.

One distribution, three packages below this one: :mod:`calib` (feature banks, the DisAlign estimator,
the baselines, evaluation), :mod:`feature_extract` (images → banks), :mod:`service` (the REST server).
This package holds the version, the public Python API and the ``disalign`` command line
(:mod:`disalign.cli`)::

    import disalign

    est = disalign.DisAlign(rho="auto").fit("train.h5", val="val.h5")
    probabilities = est.predict_proba(features, logits)   # numpy arrays or torch tensors
    est.save("calib/")
    est = disalign.load_calibration("calib/")

The names below are imported from their home module on first use, so ``import disalign`` (and the
command line's ``--help``) stays fast and imports no torch until an estimator is needed.
"""

from __future__ import annotations

import importlib

from calib import __version__

# public name -> the module that defines it
_EXPORTS = {
    # estimators
    "Calibrator": "calib.estimator",
    "DisAlign": "calib.disalign",
    "Joint": "calib.baselines",
    "LogitAdjustment": "calib.baselines",
    "TauNorm": "calib.baselines",
    "LWS": "calib.baselines",
    "CRT": "calib.baselines",
    "NCM": "calib.baselines",
    "METHODS": "calib.methods",
    "method_class": "calib.methods",
    "load_calibration": "calib.methods",
    # feature banks
    "Bank": "calib.bank",
    "BankInfo": "calib.bank",
    "BankReader": "calib.bank",
    "BankWriter": "calib.bank",
    "open_bank": "calib.bank",
    "load_bank": "calib.bank",
    "write_bank": "calib.bank",
    # evaluation
    "evaluate_methods": "calib.evaluate",
    "fit_baselines": "calib.evaluate",
    "format_table": "calib.evaluate",
    "write_plots": "calib.plots",
    # errors
    "DisalignError": "calib.errors",
    "BankError": "calib.errors",
    "ArtifactError": "calib.errors",
    "InputError": "calib.errors",
    "NotFittedError": "calib.errors",
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
