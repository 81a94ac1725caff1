"""Documented default thresholds, in a module without heavy imports so the CLI parser can show them.

- many / medium / few (classification, Liu et al. 2019): training count > 100, 20..100, < 20.
- head / body / tail (segmentation, the paper's Table 6): training pixel ratio > 1 %, 0.1..1 %, < 0.1 %.
- the largest image decoded (``--max-pixels`` of ``extract`` and ``serve``): 25 Mpx, a 5000 x 5000 picture
  (75 MB as RGB); one default for both, so an image a bank was extracted from is one the server accepts.
  For ADE20K the official class slices 0–19 / 20–74 / 75–149 (``GROUPINGS``: auto picks them when the
  class statistics are ADE20K's, see ``disalign.calib.core.ade20k``).
"""

MANY_ABOVE = 100
FEW_BELOW = 20
HEAD_ABOVE = 0.01
TAIL_BELOW = 0.001
DEFAULT_MAX_PIXELS = 25_000_000
IGNORE_INDEX = 255  # a mask value that is no class (ADE20K's 'other', padding): skipped by the dense metrics

# class-prior estimation (disalign.calib.core.label_shift, disalign adapt)
PRIOR_CONCENTRATION = 10.0  # Dirichlet pseudo-counts in total, spread as the reference prior
PRIOR_SIGNIFICANCE = 1e-3  # the likelihood-ratio test's level
PRIOR_TOLERANCE = 0.005  # nats of log-likelihood gain per row that miscalibration may explain
# The largest L1 move of a published prior (label_shift.next_prior; the server and adapt --publish): a forward
# IR10 CIFAR-10 prior is 0.59 from uniform, so three estimates reach it, and no one window — however its rows
# were chosen — moves what every replica serves by more than this.
PRIOR_MAX_STEP = 0.2
GROUPINGS = ("auto", "ade20k", "ratio")
