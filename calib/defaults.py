"""Documented default thresholds, in a module without heavy imports so the CLI parser can show them.

- many / medium / few (classification, Liu et al. 2019): training count > 100, 20..100, < 20.
- head / body / tail (segmentation, the paper's Table 6): training pixel ratio > 1 %, 0.1..1 %, < 0.1 %;
  for ADE20K the official class slices 0–19 / 20–74 / 75–149 (``GROUPINGS``: auto picks them when the
  class statistics are ADE20K's, see ``calib.ade20k``).
"""

MANY_ABOVE = 100
FEW_BELOW = 20
HEAD_ABOVE = 0.01
TAIL_BELOW = 0.001
GROUPINGS = ("auto", "ade20k", "ratio")
