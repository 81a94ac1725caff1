"""Byte sizes as people write them: ``16M``, ``8MiB``, ``1.5G``, ``512k`` or a plain count — one parser for every
size flag and setting (``fit --max-memory``, ``serve --max-body-bytes`` / ``DISALIGN_MAX_BODY_BYTES`` …).

Units are binary (K = KiB = 1024 bytes; ``B``/``iB`` suffixes are optional), case-insensitive.
"""

from __future__ import annotations

import re

UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'512M', '2G', '1.5GiB', '8MiB' or a plain byte count → bytes; ValueError (one sentence) otherwise."""
    match = SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"expected a size like 16M, 8MiB or 1048576, found {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])
