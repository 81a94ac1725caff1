"""Progress bars of the long steps (fits in ``fit`` and ``eval``, dense evaluation, extraction, ``predict``).

Bars go to stderr and only when it is a terminal: a log file or a pipe never fills with carriage
returns, and ``--quiet`` turns them off everywhere. Library callers pass ``progress=False`` (the default).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, enabled: bool, total: int | None = None, desc: str = "",
                 unit: str = "it") -> tqdm:
    """A tqdm bar on stderr, disabled unless ``enabled`` and stderr is a terminal; usable as an iterator or
    with ``update(n)``. It is removed from the screen when it closes."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()), smoothing=0.05)
