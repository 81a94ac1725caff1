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


def validation_sentence(errors: Sequence[dict[str, Any]]) -> str:
    """One sentence for a list of pydantic errors: the first one, and how many more there are."""
    if not errors:
        return "the request is invalid."
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "decode error")
        return f"the request body is not valid JSON ({reason})."
    where = _location(first.get("loc", ()))
    if first.get("type") == "missing" and where == "the request body":
        return "the request body is required."
    msg = str(first.get("msg", "is invalid")).rstrip(".")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {msg[:1].lower()}{msg[1:]}{more}."
