"""Byte sizes as people write them: ``16M``, ``8MiB``, ``1.5G``, ``512k`` or a plain count — one parser for every
size flag and setting (``fit --max-memory``, ``serve --max-body-bytes`` / ``DISALIGN_MAX_BODY_BYTES`` …).

Units are binary (K = KiB = 1024 bytes; ``B``/``iB`` suffixes are optional), case-insensitive.

pydantic's :class:`~pydantic.ByteSize` does the arithmetic, but it reads ``M`` and ``MB`` as 10^6 (IEC) where
these flags have always meant MiB, and it ignores text after the unit (``16M junk`` is 16 MB to it). So
this module checks the whole text against the documented grammar and hands ByteSize the binary unit
(``16M`` → ``16MiB``); what it cannot read gets one sentence, not pydantic's error.
"""

from __future__ import annotations

import functools
import re

from pydantic import ByteSize, TypeAdapter

SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)


@functools.cache
def _byte_size() -> TypeAdapter[ByteSize]:
    """Built on first use: building a pydantic schema costs about 0.3 s in a fresh process (its plugin lookup),
    which a command line that parses no size should not pay."""
    return TypeAdapter(ByteSize)


def parse_bytes(text: str) -> int:
    """'512M', '2G', '1.5GiB', '8MiB' or a plain byte count → bytes; ValueError (one sentence) otherwise."""
    match = SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"expected a size like 16M, 8MiB or 1048576, found {text!r}")
    number, unit = match.group(1), match.group(2)
    return int(_byte_size().validate_python(f"{number}{unit}iB" if unit else number))
