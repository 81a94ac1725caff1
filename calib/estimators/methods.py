"""The calibration methods by name: the one list, used by the command line, the evaluator and the server.

:data:`METHODS` maps each name to its estimator class, in the order of the ``eval`` table. A class is
imported from its home module on first use, so the command line (whose help lists the names) imports no
torch; ``tuple(METHODS)`` is every method name.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from disalign.calib.errors import ArtifactError, InputError

if TYPE_CHECKING:
    from disalign.calib.estimators.base import Calibrator

# name -> (home module, class); each class's ``method`` attribute is its name here (a test checks it)
_HOMES: dict[str, tuple[str, str]] = {
    "joint": ("disalign.calib.estimators.baselines.prior", "Joint"),
    "disalign": ("disalign.calib.estimators.disalign", "DisAlign"),
    "logit-adjust": ("disalign.calib.estimators.baselines.prior", "LogitAdjustment"),
    "tau-norm": ("disalign.calib.estimators.baselines.tau_norm", "TauNorm"),
    "lws": ("disalign.calib.estimators.baselines.retrain", "LWS"),
    "crt": ("disalign.calib.estimators.baselines.retrain", "CRT"),
    "ncm": ("disalign.calib.estimators.baselines.ncm", "NCM"),
    "tde": ("disalign.calib.estimators.baselines.tde", "TDE"),
}


class _Methods(Mapping[str, "type[Calibrator]"]):
    """Read-only ``name -> estimator class``; the classes are imported when first looked up."""

    def __getitem__(self, name: str) -> type[Calibrator]:
        module, cls = _HOMES[name]
        return getattr(importlib.import_module(module), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(_HOMES)

    def __len__(self) -> int:
        return len(_HOMES)

    def __repr__(self) -> str:
        return f"METHODS({', '.join(_HOMES)})"


METHODS: Mapping[str, type[Calibrator]] = _Methods()
BASELINE_NAMES: tuple[str, ...] = tuple(name for name in METHODS if name != "disalign")


def method_class(name: str) -> type[Calibrator]:
    """The estimator class for a method name; the error lists the valid names."""
    if name not in METHODS:
        raise InputError(f"method should be one of {', '.join(METHODS)}, found {name!r}.")
    return METHODS[name]


def load_calibration(directory: str | os.PathLike) -> Calibrator:
    """Load any calibration artifact, dispatching on the method recorded in its metadata (the files are read
    once, so the method and the parameters always come from the same version)."""
    from disalign.calib.artifact.format import read_artifact

    params, meta = read_artifact(directory)
    if meta.method not in METHODS:
        raise ArtifactError(f"{directory} holds an unknown method {meta.method!r}; known: {', '.join(METHODS)}.")
    return METHODS[meta.method].from_artifact(params, meta, str(directory))
