"""ADE20K SceneParsing's 150 classes: the official head / body / tail split and a test for its statistics.

The DisAlign paper's ADE20K groups (Table 6) are fixed slices of the class index — head 0–19, body 20–74,
tail 75–149 — that follow the ``Ratio`` column of ADE20K's ``objectInfo150`` table (classes are numbered
by decreasing pixel ratio: head ≥ 1 %, tail ≤ 0.1 % of the table's ratios, which sum to 92.75 %: the rest
is unlabelled). Thresholds on renormalised ratios move two classes (index 20, ratio 0.98 % → 1.06 %, into
the head; index 75, exactly 0.1 %, out of the tail), so the slices are used whenever the class statistics
are ADE20K's (:func:`has_ade20k_statistics`).
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 150
SLICES = {"head": range(0, 20), "body": range(20, 75), "tail": range(75, 150)}
# objectInfo150.txt, column Ratio, in class index order (Idx 1 … 150)
RATIOS = np.array([
    0.1576, 0.1072, 0.0878, 0.0621, 0.0480, 0.0450, 0.0398, 0.0231, 0.0198, 0.0183, 0.0181, 0.0166, 0.0160, 0.0151, 0.0118,
    0.0110, 0.0109, 0.0104, 0.0104, 0.0103, 0.0098, 0.0074, 0.0067, 0.0065, 0.0061, 0.0060, 0.0053, 0.0052, 0.0046, 0.0044,
    0.0044, 0.0044, 0.0033, 0.0031, 0.0030, 0.0027, 0.0026, 0.0024, 0.0024, 0.0023, 0.0023, 0.0022, 0.0022, 0.0020, 0.0019,
    0.0019, 0.0018, 0.0018, 0.0018, 0.0018, 0.0018, 0.0018, 0.0018, 0.0017, 0.0017, 0.0017, 0.0017, 0.0017, 0.0015, 0.0015,
    0.0015, 0.0015, 0.0014, 0.0014, 0.0014, 0.0014, 0.0014, 0.0013, 0.0013, 0.0013, 0.0012, 0.0012, 0.0012, 0.0012, 0.0011,
    0.0010, 0.0009, 0.0009, 0.0009, 0.0009, 0.0009, 0.0008, 0.0008, 0.0008, 0.0008, 0.0008, 0.0007, 0.0007, 0.0007, 0.0007,
    0.0007, 0.0007, 0.0007, 0.0006, 0.0006, 0.0006, 0.0006, 0.0006, 0.0006, 0.0006, 0.0006, 0.0006, 0.0006, 0.0006, 0.0005,
    0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005,
    0.0005, 0.0004, 0.0004, 0.0004, 0.0004, 0.0004, 0.0004, 0.0004, 0.0004, 0.0004, 0.0004, 0.0004, 0.0004, 0.0004, 0.0003,
    0.0003, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003, 0.0002, 0.0002, 0.0002,
])
# How close normalised training statistics must be to the table's: its 4-decimal rounding (±5e-5 before
# normalisation) and some slack for pixel counts measured at another resolution.
ABSOLUTE_TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 0.1


def has_ade20k_statistics(class_counts: np.ndarray | list[int]) -> bool:
    """True when the (K,) training counts are ADE20K's: K = 150 and, normalised, the objectInfo150 ratios
    within the tolerances above (``--class-stats objectInfo150.txt`` banks, or counts of ADE20K's masks)."""
    counts = np.asarray(class_counts, dtype=np.float64).reshape(-1)
    if counts.size != NUM_CLASSES or counts.sum() <= 0:
        return False
    ours, table = counts / counts.sum(), RATIOS / RATIOS.sum()
    return bool(np.all(np.abs(ours - table) <= ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * table))


def official_groups() -> dict[str, np.ndarray]:
    """Boolean masks (150,) of the official head / body / tail slices."""
    masks = {}
    for name, indices in SLICES.items():
        mask = np.zeros(NUM_CLASSES, dtype=bool)
        mask[list(indices)] = True
        masks[name] = mask
    return masks
