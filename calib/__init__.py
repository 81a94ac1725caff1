"""disalign.calib — fit DisAlign and its baselines on cached stage-1 tensors (feature banks)."""

from disalign.calib.errors import (
    ArtifactError,
    BankError,
    DisalignError,
    DisalignWarning,
    InputError,
    NotFittedError,
)

__version__ = "0.1.0"

__all__ = ["ArtifactError", "BankError", "DisalignError", "DisalignWarning", "InputError", "NotFittedError", "__version__"]
