"""Which preprocessing the server applies to images: the one the calibration's banks were extracted with.

A calibration records its training bank's ``preprocessing`` (``resize``, ``crop``, ``mean``, ``std``, ``interpolation``;
see ``docs/calibration-format.md``). The server takes, in this order:

- the model card (``--card`` / ``DISALIGN_CARD``), which must then agree with the recorded one;
- ``--preprocessing imagenet`` (``DISALIGN_PREPROCESSING``), which must agree as well;
- else the recorded preprocessing itself;
- and with none of the three it refuses to start rather than guess.

A reload refuses a calibration whose recorded preprocessing differs from the one being served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from disalign.calib.errors import ArtifactError, InputError
from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.preprocess import Preprocessing

# (name in the record / attribute of Preprocessing, name in a model card)
CARD_NAMES = {"resize": "input.resize", "crop": "input.size", "mean": "input.mean", "std": "input.std",
              "interpolation": "input.interpolation"}


def recorded_preprocessing(record: dict[str, Any] | None) -> Preprocessing | None:
    """The image preprocessing a calibration records, or None when it records none (or a dense model's geometry)."""
    if not record or "crop" not in record:
        return None
    try:
        return Preprocessing.from_record(record)
    except (KeyError, TypeError, ValueError, IndexError, ExtractError) as exc:
        raise ArtifactError(f"the calibration's 'preprocessing' record is malformed ({type(exc).__name__}: {exc}).") from None


def serving_preprocessing(card: Path | None, named: str | None, record: dict[str, Any] | None) -> Preprocessing:
    """The preprocessing to serve with (see the module docstring); raises a one-sentence error."""
    recorded = recorded_preprocessing(record)
    if card is not None and named is not None:
        raise InputError("give either --card (DISALIGN_CARD) or --preprocessing (DISALIGN_PREPROCESSING), not both.")
    if card is not None:
        chosen, source = Preprocessing.from_card(card), f"model card {card}"
    elif named == "imagenet":
        chosen, source = Preprocessing.imagenet(), "--preprocessing imagenet"
    elif recorded is not None:
        return recorded
    else:
        raise InputError("the calibration does not record the preprocessing of its banks, so the server cannot know how to "
                         "prepare images: pass --card (DISALIGN_CARD) or --preprocessing imagenet (DISALIGN_PREPROCESSING).")
    if recorded is not None:
        check_same_preprocessing(chosen, recorded, source)
    return chosen


def check_same_preprocessing(served: Preprocessing, recorded: Preprocessing, source: str) -> None:
    """Raise :class:`ArtifactError` naming the first field where ``served`` differs from the banks' ``recorded``."""
    difference = served.first_difference(recorded)
    if difference is not None:
        record_name, mine, theirs = difference
        field = CARD_NAMES[record_name] if source.startswith("model card") else record_name
        raise ArtifactError(f"the {source} has {field} {mine} but the calibration's banks were extracted with "
                            f"{record_name} {theirs}; serve with the preprocessing of the banks "
                            "(without --card, the calibration's own is used).")
