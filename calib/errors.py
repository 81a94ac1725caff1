"""Exceptions raised by disalign.

Every user-facing failure is a :class:`DisalignError` carrying one clear sentence that names the field,
what was expected and what was found. The CLI prints ``error: <sentence>`` and exits with status 2; the
server turns it into a JSON error body. Anything else escaping is a bug.

- :class:`BankError` — a feature bank is missing, unreadable, or does not match its spec.
- :class:`ArtifactError` — a calibration artifact is missing, corrupt, or does not match a bank/model.
- :class:`InputError` — tensors or arguments passed to an estimator have the wrong shape, dtype or values.
- :class:`NotFittedError` — an estimator was used before ``fit`` or ``load``.

The library never prints: a result that is usable but suspect (a saturated DisAlign gate, say) is a
:class:`DisalignWarning` (``warnings.warn``), which the CLI shows as a ``warning: <sentence>`` line.
"""

from __future__ import annotations


class DisalignError(ValueError):
    """Base class: a user-facing error with one clear sentence."""


class BankError(DisalignError):
    """A feature bank is missing, unreadable or malformed."""


class ArtifactError(DisalignError):
    """A calibration artifact is missing, corrupt, or incompatible."""


class InputError(DisalignError):
    """Tensors or arguments have the wrong shape, dtype or values."""


class NotFittedError(DisalignError, AttributeError):
    """An estimator was used before fit() or load() (an AttributeError too, as scikit-learn's, so that
    ``hasattr(est, "classes_")`` is False before fit)."""


def some_of(items, limit: int = 10) -> str:
    """``"a, b, c"`` or, past ``limit``, ``"a, b, … j and 990 more"``: an error names what it found and counts the rest."""
    items = [str(item) for item in items]
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


class DisalignWarning(UserWarning):
    """A fit or result that is usable but suspect, in one sentence (also recorded where it is kept, e.g.
    the fit report's ``warnings``)."""
