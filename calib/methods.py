"""The calibration methods by name: one explicit mapping, used by the CLI, the evaluator and the server."""

from __future__ import annotations

import os

from calib.baselines import BASELINES
from calib.disalign import DisAlign
from calib.errors import ArtifactError, InputError
from calib.estimator import Calibrator, read_artifact

METHODS: dict[str, type[Calibrator]] = {
    DisAlign.method: DisAlign,
    **BASELINES,
}


def method_class(name: str) -> type[Calibrator]:
    """The estimator class for a method name; the error lists the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"method should be one of {', '.join(METHODS)}, found {name!r}.") from None


def load_calibration(directory: str | os.PathLike) -> Calibrator:
    """Load any calibration artifact, dispatching on the method recorded in its metadata (the files are read
    once, so the method and the parameters always come from the same version)."""
    params, meta = read_artifact(directory)
    if meta.method not in METHODS:
        raise ArtifactError(f"{directory} holds an unknown method {meta.method!r}; known: {', '.join(METHODS)}.")
    return METHODS[meta.method].from_artifact(params, meta, str(directory))
