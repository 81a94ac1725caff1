"""JSON text from files a user hands us (calibration.json, bank attributes, prior files, model cards), read with
a bound on its nesting.

``json.loads`` recurses once per nested array or object: 100,000 ``[`` raise a ``RecursionError`` (a
traceback, not a sentence), and a few hundred levels that it still reads break later code that recurses
over the value (``dataclasses.asdict``, ``copy.deepcopy``, pydantic). None of our formats nests more than a
handful of levels (``report.rho_curve[i].rho`` is four), so anything deeper than :data:`MAX_DEPTH` is refused
with one sentence, before any other code sees it. The depth is measured without recursion.
"""

from __future__ import annotations

import json
from typing import Any

from disalign.calib.errors import DisalignError

MAX_DEPTH = 32  # arrays and objects inside one another; our formats use at most 5


def loads(text: str | bytes, what: str, error: type[DisalignError]) -> Any:
    """``json.loads(text)``, or ``error("<what> is nested deeper than 32 levels …")``.

    ``json.JSONDecodeError`` and ``UnicodeDecodeError`` pass through unchanged: each caller words its own
    "not JSON" sentence.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(too_deep(what)) from None
    if nesting_depth(value) > MAX_DEPTH:
        raise error(too_deep(what))
    return value


def too_deep(what: str) -> str:
    return f"{what} is nested deeper than {MAX_DEPTH} levels (JSON arrays and objects)."


def nesting_depth(value: Any) -> int:
    """How many arrays and objects are nested at the deepest point of a parsed JSON value (a scalar: 0)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:  # deep enough to refuse: no need to walk the rest
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest
