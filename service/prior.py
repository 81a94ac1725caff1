"""The class prior the server aligns its predictions to (``DISALIGN_PRIOR``), and its estimate from the traffic.

- ``balanced`` (default): the calibration as fitted, for a balanced deployment (today's behaviour);
- a prior file (JSON, the format ``disalign adapt --json`` writes): predictions aligned to that prior;
- ``adaptive``: the server keeps a sliding window of the calibrated, balanced probabilities it served
  (``prior_window`` rows × K float32: bounded memory), and every ``prior_update_every`` requests, once the
  window holds ``prior_min_rows`` rows, re-estimates the traffic's prior on a thread of its own (MAP-EM
  with the likelihood-ratio test of :mod:`disalign.calib.core.label_shift`). The estimate is applied only when the test
  rejects the balanced reference; until then, and whenever it does not, the server stays balanced.

Aligned predictions are p_π(y|x) ∝ softmax(z / T + b)_y · π_y (z: the calibration's logits, T and b: the
probability calibration stored in the artifact, T = 1 and b = 0 without one); their logits are
z / T + b + log π + const, the math of :func:`disalign.calib.core.label_shift.adjust_to_prior` (``disalign
adapt``, ``eval --target-prior``). The runtime applies the prior to every batch it computes, rows and images
alike (:meth:`PriorTracker.apply`). A request may ask for ``prior=balanced``; every
response names the prior version it used: ``balanced``, or ``<source>-<12 hex>`` with source
``estimate``, ``file`` or ``admin``.

The current prior is one immutable :class:`PriorState`, swapped by assignment (a batch takes one
snapshot). A new calibration (a reload) resets the window and the estimate: the first batch computed
with it, or the next ``/admin/prior``, notices. ``POST /admin/prior`` freezes, unfreezes, resets or sets the prior
(:mod:`disalign.service.routers.prior`). A calibration that already carries a target prior (``disalign adapt
--out``) is served as it is: the server's prior does not apply to it. The metrics this sets are
:class:`disalign.service.metrics.PriorMetrics`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from disalign.calib.core import label_shift

if TYPE_CHECKING:
    from disalign.service.metrics import PriorMetrics
    from disalign.service.settings import Settings
    from disalign.service.state import CalibrationState

log = logging.getLogger("service")

BALANCED = "balanced"
ADAPTIVE = "adaptive"


@dataclass(frozen=True)
class PriorState:
    """One prior the server applies: logits z → z / T + ``offset``, with ``offset`` (K,) = b + log π − log π_ref; None = balanced.

    ``offset`` is :func:`~disalign.calib.core.label_shift.adjust_to_prior` evaluated once, when the state is
    made: that function is affine in z with slope 1 / T, and calling it on every batch would cost 0.2–0.4 ms
    (measured at K = 10 and 1000: it validates the prior and builds b from the artifact's numbers each time),
    as much as the rest of a small batch. ``tests/service/test_prior.py`` checks that :meth:`adjust` equals it.
    """

    version: str
    source: str  # balanced | estimate | file | admin
    prior: np.ndarray | None  # (K,) float64
    calibration_version: str
    temperature: float = 1.0
    offset: torch.Tensor | None = None  # (K,) float32

    def version_for(self, use_prior: bool) -> str:
        """The version a request names: this one, or ``balanced`` for a request that asked for it."""
        return self.version if use_prior else BALANCED

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) float32 of p_π(y|x); the logits themselves when balanced."""
        if self.offset is None:
            return logits
        return logits / self.temperature + self.offset


def make_state(source: str, prior: np.ndarray | None, calibration: CalibrationState) -> PriorState:
    """The state applying ``prior`` (K,) (None: balanced) with the calibration's probability calibration."""
    if prior is None:
        return PriorState(BALANCED, BALANCED, None, calibration.version)
    prior = np.asarray(prior, dtype=np.float64)
    digest = hashlib.sha256(prior.tobytes() + calibration.version.encode()).hexdigest()[:12]
    stored = calibration.meta.probability_calibration
    fitted = label_shift.ProbabilityCalibration.from_json(stored) if stored else None
    offset = label_shift.adjust_to_prior(torch.zeros(1, prior.size), torch.from_numpy(prior), fitted)[0].float()
    return PriorState(f"{source}-{digest}", source, prior, calibration.version,
                      fitted.temperature if fitted else 1.0, offset)


@dataclass(frozen=True)
class Estimate:
    """The latest estimate of the adaptive mode and its test."""

    prior: list[float]
    statistic: float
    p_value: float
    adapt: bool
    rows: int
    time: float


class PriorTracker:
    """The served prior and, in adaptive mode, the window of traffic and the re-estimation thread.

    ``apply`` is called by the batch functions (event loop, calibration thread or inference thread), so
    the window and the counters are guarded by a lock; the estimate runs on a thread of its own.
    """

    def __init__(self, settings: Settings, metrics: PriorMetrics, current_calibration: Callable[[], CalibrationState]):
        self.mode = settings.prior
        self.window_capacity = settings.prior_window
        self.update_every = settings.prior_update_every
        self.min_rows = settings.prior_min_rows
        self.metrics = metrics
        self._current_calibration = current_calibration
        self._lock = threading.Lock()
        self._file_prior: np.ndarray | None = None
        self._state: PriorState | None = None  # set by start()
        self._window: np.ndarray | None = None
        self._reference: PriorState | None = None
        self._filled = 0
        self._next = 0
        self._requests = 0
        self._generation = 0  # bumped by every reset: an estimate started before it is dropped
        self._estimating = False
        self._estimate_thread: threading.Thread | None = None
        self.frozen = False
        self.last_estimate: Estimate | None = None

    @property
    def state(self) -> PriorState:
        assert self._state is not None, "start() is called when the runtime loads"
        return self._state

    @property
    def adaptive(self) -> bool:
        return self.mode == ADAPTIVE

    # -- start-up and resets ------------------------------------------------------------------
    def start(self, calibration: CalibrationState) -> None:
        """Read the prior file (if any) and start balanced or at the file's prior; raises InputError."""
        if self.mode not in (BALANCED, ADAPTIVE):
            self._file_prior = label_shift.read_prior_file(self.mode, calibration.class_names).numpy()
        if self.mode != BALANCED and calibration.meta.target_prior is not None:
            log.warning("the calibration is aligned to a target prior already; DISALIGN_PRIOR=%s does not apply to it", self.mode)
        if self.adaptive and calibration.meta.probability_calibration is None:
            log.warning("the calibration has no probability calibration (fit it with --val): the adaptive prior uses T = 1, b = 0")
        with self._lock:
            self._reset_locked(calibration)

    def reset(self) -> PriorState:
        """Back to the start: empty window, no estimate, unfrozen, balanced (or the file's prior)."""
        with self._lock:
            self._reset_locked(self._current_calibration())
            return self.state

    def _reset_locked(self, calibration: CalibrationState) -> None:
        self._generation += 1
        self._filled = self._next = self._requests = 0
        k = calibration.meta.num_classes
        self._window = np.empty((self.window_capacity, k), np.float32) if self.adaptive else None
        self._reference = make_state("reference", np.full(k, 1.0 / k), calibration)  # z / T + b: what the window holds
        self.frozen = False
        self.last_estimate = None
        self._publish(make_state("file", self._file_prior, calibration) if self._file_prior is not None
                      else make_state(BALANCED, None, calibration), calibration)

    def _publish(self, state: PriorState, calibration: CalibrationState) -> None:
        self._state = state
        m = self.metrics
        m.info.info({"mode": "file" if self._file_prior is not None else self.mode, "version": state.version,
                     "source": state.source, "frozen": str(self.frozen).lower()})
        m.window_rows.set(self._filled)
        estimate = self.last_estimate
        prior = torch.tensor(estimate.prior, dtype=torch.float64) if estimate else None
        k = calibration.meta.num_classes
        counts = calibration.meta.class_counts
        train = label_shift.check_prior([float(c) for c in counts], k, "class counts") if counts and sum(counts) > 0 else None
        m.distance.labels("uniform").set(label_shift.l1_distance(prior, label_shift.uniform_prior(k)) if prior is not None else 0.0)
        m.distance.labels("train").set(label_shift.l1_distance(prior, train) if prior is not None and train is not None else 0.0)
        if estimate is not None:
            m.last_update.set(estimate.time)
            m.p_value.set(estimate.p_value)

    # -- admin commands -----------------------------------------------------------------------
    def freeze(self, frozen: bool) -> PriorState:
        with self._lock:
            self.frozen = frozen
            self._publish(self.state, self._current_calibration())
            return self.state

    def set_prior(self, values: list[float]) -> PriorState:
        """Serve ``values`` (K,) from now on, frozen (an estimate would replace it otherwise)."""
        calibration = self._current_calibration()
        prior = label_shift.check_prior(values, calibration.meta.num_classes, "prior").numpy()
        with self._lock:
            self._generation += 1
            self.frozen = True
            self._publish(make_state("admin", prior, calibration), calibration)
            return self.state

    # -- the hot path -------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, use_prior: torch.Tensor | bool, calibration: CalibrationState,
              requests: int = 1) -> tuple[torch.Tensor, PriorState]:
        """Align a batch's calibrated logits (N, K) to the served prior on the rows with ``use_prior`` (N,) and
        (adaptive mode) add the rows to the window → (logits (N, K) float32, the state used).

        Called once per batch by the runtime, for rows and images alike: ``requests`` counts towards
        ``prior_update_every``."""
        state = self._state
        if state is None or (state.offset is None and not self.adaptive):
            return logits, state or make_state(BALANCED, None, calibration)
        if calibration.meta.target_prior is not None:
            return logits, make_state(BALANCED, None, calibration)  # aligned by the artifact itself (module docstring)
        if state.calibration_version != calibration.version:
            if self._current_calibration().version != calibration.version:
                return logits, make_state(BALANCED, None, calibration)  # a batch of the old calibration, after a reload
            state = self._follow(calibration)  # the first batch of a reloaded calibration
        if self.adaptive:
            self._observe(logits, calibration, requests)
        if state.offset is None or use_prior is False:
            return logits, state
        adjusted = state.adjust(logits)
        if isinstance(use_prior, torch.Tensor) and not bool(use_prior.all()):
            adjusted = torch.where(use_prior[:, None], adjusted, logits)
        return adjusted, state

    def _follow(self, calibration: CalibrationState) -> PriorState:
        """Reset if ``calibration`` (the runtime's current one) is not the one the state was made for: a reload."""
        with self._lock:
            if self.state.calibration_version != calibration.version:
                self._reset_locked(calibration)
            return self.state

    def _observe(self, logits: torch.Tensor, calibration: CalibrationState, requests: int) -> None:
        probabilities = torch.softmax(self._reference.adjust(logits), dim=1).numpy()  # (N, K): softmax(z / T + b)
        with self._lock:
            window = self._window
            assert window is not None
            rows = probabilities[-window.shape[0]:]
            n = rows.shape[0]
            first = min(n, window.shape[0] - self._next)
            window[self._next:self._next + first] = rows[:first]
            window[:n - first] = rows[first:]
            self._next = (self._next + n) % window.shape[0]
            self._filled = min(window.shape[0], self._filled + n)
            self._requests += requests
            due = (not self.frozen and not self._estimating and self._requests >= self.update_every
                   and self._filled >= self.min_rows)
            if due:
                self._estimating = True
                self._requests = 0
                snapshot, generation = window[:self._filled].copy(), self._generation
            self.metrics.window_rows.set(self._filled)
        if due:
            self._estimate_thread = threading.Thread(target=self._estimate, args=(snapshot, generation, calibration),
                                                     name="disalign-prior", daemon=True)
            self._estimate_thread.start()

    def _estimate(self, window: np.ndarray, generation: int, calibration: CalibrationState) -> None:
        """On the estimation thread: MAP-EM and the test on a copy of the window, then publish (unless reset since)."""
        try:
            result = label_shift.estimate_prior(torch.from_numpy(window))
            estimate = Estimate(result.prior.tolist(), result.statistic, result.p_value, result.adapt, result.num_samples, time.time())
            with self._lock:
                if generation != self._generation or self.frozen:
                    return
                self.last_estimate = estimate
                self.metrics.estimates.labels("adapt" if result.adapt else "keep").inc()
                self._publish(make_state("estimate", result.prior.numpy(), calibration) if result.adapt
                              else make_state(BALANCED, None, calibration), calibration)
        except Exception:  # never let a failed estimate take the server down: the previous prior keeps serving
            log.exception("the prior estimate failed; the previous prior keeps serving")
        finally:
            with self._lock:
                self._estimating = False

    def wait_for_estimate(self, timeout: float = 10.0) -> None:
        """Block until the running estimate (if any) has finished (tests and benchmarks)."""
        thread = self._estimate_thread
        if thread is not None:
            thread.join(timeout)

    def status(self) -> dict:
        """What ``/admin/prior`` answers (balanced for a runtime that never started it: a dense model)."""
        state = self._follow(self._current_calibration()) if self._state is not None else PriorState(BALANCED, BALANCED, None, "")
        estimate = self.last_estimate
        return {"mode": "file" if self._file_prior is not None else self.mode, "version": state.version, "source": state.source,
                "frozen": self.frozen, "prior": state.prior.tolist() if state.prior is not None else None,
                "window_rows": self._filled, "window_capacity": self.window_capacity if self.adaptive else 0,
                "estimate": None if estimate is None else {"prior": estimate.prior, "statistic": estimate.statistic,
                                                           "p_value": estimate.p_value, "adapt": estimate.adapt,
                                                           "rows": estimate.rows, "time": estimate.time}}

