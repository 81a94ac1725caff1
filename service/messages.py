"""One-sentence messages for pydantic validation errors (request bodies, settings); no heavy imports here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _location(loc: Sequence[Any]) -> str:
    parts = list(loc)
    prefix = ""
    if parts and parts[0] in ("query", "path", "header", "cookie"):
        prefix, parts = f"{parts[0]} parameter ", parts[1:]
    elif parts and parts[0] == "body":
        parts = parts[1:]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return prefix + (text or "the request body")


MAX_LISTED = 5  # further problems named in one sentence; the rest are counted


def further_problems(descriptions: Sequence[str]) -> str:
    """`` (and N more problems: a; b; …; and M others)``, naming up to :data:`MAX_LISTED`; '' for none."""
    n = len(descriptions)
    if not n:
        return ""
    rest = n - min(n, MAX_LISTED)
    tail = f"; and {rest} other{'s' if rest != 1 else ''}" if rest else ""
    return f" (and {n} more problem{'s' if n != 1 else ''}: {'; '.join(descriptions[:MAX_LISTED])}{tail})"


def _problem(error: dict[str, Any]) -> str:
    msg = str(error.get("msg", "is invalid")).rstrip(".")
    return f"{_location(error.get('loc', ()))}: {msg[:1].lower()}{msg[1:]}"


def validation_sentence(errors: Sequence[dict[str, Any]]) -> str:
    """One sentence for a list of pydantic errors: the first one, then the others, named (up to a few) and counted."""
    if not errors:
        return "the request is invalid."
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "decode error")
        return f"the request body is not valid JSON ({reason})."
    where = _location(first.get("loc", ()))
    if first.get("type") == "missing" and where == "the request body":
        return "the request body is required."
    return f"{_problem(first)}{further_problems([_problem(e) for e in errors[1:]])}."
