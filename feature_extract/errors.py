"""Exceptions raised by feature_extract; all are :class:`disalign.calib.errors.DisalignError` subclasses.

- :class:`ExtractError` — a bad argument, list file, model, or work directory (one clear sentence).
- :class:`EmptyBankError` — no image could be decoded, so no bank is written.
- :class:`ImageDecodeError` — an image file is missing, truncated or not an image.
- :class:`ImageTooLargeError` — an image has more pixels than allowed (checked before the full decode).
- :class:`ExportError` — a calibration or model that cannot be exported, or an exported graph that disagrees.
"""

from __future__ import annotations

from disalign.calib.errors import DisalignError


class ExtractError(DisalignError):
    """A user-facing extraction error: the argument, what was expected and what was found."""


class EmptyBankError(ExtractError):
    """Every row was skipped: there is nothing to write a bank of."""


class ImageDecodeError(ExtractError):
    """An image cannot be read or decoded."""


class ImageTooLargeError(ImageDecodeError):
    """An image has more pixels than ``max_pixels``."""


class ExportError(DisalignError):
    """A calibration or model that ``disalign export`` cannot write as a graph, or a graph that does not
    reproduce the library's answers (one sentence)."""
