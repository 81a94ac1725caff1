"""The class prior the server aligns its predictions to (``DISALIGN_PRIOR``), and the deployment's estimate of it.

- ``balanced`` (default): the calibration as fitted, for a balanced deployment;
- a prior file (JSON, the format ``disalign adapt --json`` writes): predictions aligned to that prior;
- ``adaptive``: the server serves the **deployment's published prior** — the version that
  ``DIR/prior/published/current`` points to (:mod:`disalign.calib.artifact.priors`), followed by the same
  watcher as the calibration, so every replica serves the same version within about one watch interval.
  Only trusted traffic moves it: rows of requests that carry a source's token (:mod:`disalign.service.traffic`,
  ``DISALIGN_PRIOR_SOURCES``) are kept in that source's window; every ``prior_update_every`` trusted requests
  a replica writes its window to the store and, if no other replica is doing so (a lock), pools every
  replica's windows, caps each source at its ``max_share`` of the rows, estimates each source's prior
  (MAP-EM, kept only if that source's rows reject the balanced reference), averages them by share and
  publishes a new version only after the checks of :func:`disalign.calib.core.label_shift.next_prior`: it
  must explain the rows significantly better than the current prior, and moves at most ``prior_max_step``
  (L1) from it. A source with share w thus moves the target by at most 2w, whatever rows it sends. Untrusted requests are answered with the
  published prior and never looked at again. A server without sources only follows (``disalign adapt
  --publish`` or another replica publishes).

Aligned predictions are p_π(y|x) ∝ softmax(z / T + b)_y · π_y (z: the calibration's logits, T and b: the
probability calibration stored in the artifact, T = 1 and b = 0 without one); their logits are
z / T + b + log π + const, the math of :func:`disalign.calib.core.label_shift.adjust_to_prior`. The runtime
applies the prior to every batch it computes, rows and images alike (:meth:`PriorTracker.apply`). A request may
ask for ``prior=balanced``; every response names the prior version it used: ``balanced``, or
``<source>-<12 hex>`` with source ``estimate``, ``adapt`` (published offline), ``admin`` or ``file`` — the
same name on every replica serving the same published version.

The current prior is one immutable :class:`PriorState`, swapped by assignment (a batch takes one snapshot). A
published version names the calibration it was estimated with; a server serving another one serves it
balanced, and a reload empties the windows (their rows were computed with the old calibration). ``POST
/admin/prior`` (:mod:`disalign.service.routers.prior`) publishes ``set``, ``freeze``, ``unfreeze`` and ``reset``
in adaptive mode, for every replica; in the other modes it changes this process only. A calibration that
carries a target prior (``disalign adapt --out``) is served as it is. The metrics are
:class:`disalign.service.metrics.PriorMetrics`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from disalign.calib.artifact import priors
from disalign.calib.core import label_shift
from disalign.calib.errors import ArtifactError
from disalign.service.traffic import UNTRUSTED, TrafficSources, TrafficWindows

if TYPE_CHECKING:
    from disalign.service.metrics import PriorMetrics
    from disalign.service.settings import Settings
    from disalign.service.state import CalibrationState

log = logging.getLogger("service")

BALANCED = "balanced"
ADAPTIVE = "adaptive"
ADMIN_LOCK_WAIT_S = 10.0  # an admin command waits this long for a replica's estimate to finish


class PriorStoreError(ArtifactError):
    """The deployment's prior could not be published (a read-only or missing prior directory): 409."""


@dataclass(frozen=True)
class PriorState:
    """One prior the server applies: logits z → z / T + ``offset``, with ``offset`` (K,) = b + log π − log π_ref; None = balanced.

    ``offset`` is :func:`~disalign.calib.core.label_shift.adjust_to_prior` evaluated once, when the state is
    made: that function is affine in z with slope 1 / T, and calling it on every batch would cost 0.2–0.4 ms
    (measured at K = 10 and 1000: it validates the prior and builds b from the artifact's numbers each time),
    as much as the rest of a small batch. ``tests/service/test_prior.py`` checks that :meth:`adjust` equals it.
    """

    version: str
    source: str  # balanced | estimate | adapt | admin | file
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
    digest = priors.prior_digest(prior, calibration.version)
    stored = calibration.meta.probability_calibration
    fitted = label_shift.ProbabilityCalibration.from_json(stored) if stored else None
    offset = label_shift.adjust_to_prior(torch.zeros(1, prior.size), torch.from_numpy(prior), fitted)[0].float()
    return PriorState(f"{source}-{digest}", source, prior, calibration.version,
                      fitted.temperature if fitted else 1.0, offset)


@dataclass(frozen=True)
class Estimate:
    """The latest estimate this replica made, and what came of it."""

    prior: list[float]  # the target: the sources' priors weighted by their (capped) shares
    statistic: float  # its test against the prior served
    p_value: float
    adapt: bool  # whether any source's rows rejected the balanced reference
    rows: int
    time: float
    rows_by_source: dict[str, int] = dataclasses.field(default_factory=dict)
    published: bool = False
    reason: str = ""


class PriorTracker:
    """The served prior; in adaptive mode also the trusted windows, the estimation thread and the published version.

    ``apply`` is called by the batch functions (event loop, calibration thread or inference thread), so the
    state and the counters are guarded by a lock; the estimate (file I/O and EM) runs on a thread of its own,
    and :meth:`follow` (the watcher's poll) on a worker thread.
    """

    def __init__(self, settings: Settings, metrics: PriorMetrics, current_calibration: Callable[[], CalibrationState]):
        self.mode = settings.prior
        self.window_capacity = settings.prior_window
        self.update_every = settings.prior_update_every
        self.min_rows = settings.prior_min_rows
        self.max_step = settings.prior_max_step
        self.traffic_max_age_s = settings.prior_traffic_max_age_s
        self.sources = TrafficSources({n: s.token.get_secret_value() for n, s in settings.prior_sources.items()},
                                      {n: s.max_share for n, s in settings.prior_sources.items()})
        self.store = priors.prior_dir(settings.calibration, settings.prior_dir) if self.mode == ADAPTIVE else None
        self.replica = priors.replica_name()
        self.metrics = metrics
        self._current_calibration = current_calibration
        self._lock = threading.Lock()
        self._file_prior: np.ndarray | None = None
        self._state: PriorState | None = None  # set by start()
        self._reference: PriorState | None = None
        self._windows: TrafficWindows | None = None
        self._requests = 0
        self._generation = 0  # bumped whenever the windows are emptied: an estimate started before is dropped
        self._estimating = False
        self._estimate_thread: threading.Thread | None = None
        self._frozen = False  # balanced and file modes: this process's own
        self._published: tuple[str, priors.PriorVersion] | None = None  # adaptive: (pointer, version) followed
        self._unreadable: str | None = None  # a pointer whose version could not be read (reported once)
        self.last_estimate: Estimate | None = None

    @property
    def state(self) -> PriorState:
        assert self._state is not None, "start() is called when the runtime loads"
        return self._state

    @property
    def adaptive(self) -> bool:
        return self.mode == ADAPTIVE

    @property
    def contributes(self) -> bool:
        """Whether this server keeps trusted windows and estimates (adaptive, with sources configured)."""
        return self.adaptive and bool(self.sources)

    @property
    def frozen(self) -> bool:
        if self.adaptive:
            return self._published is not None and self._published[1].frozen
        return self._frozen

    @property
    def epoch(self) -> str:
        return self._published[1].epoch if self._published is not None else priors.INITIAL_EPOCH

    def source_of(self, token: str | None) -> str | None:
        """The trusted source a request's ``Disalign-Traffic-Token`` names (None: untrusted, or not adaptive)."""
        return self.sources.identify(token) if self.contributes else None

    # -- start-up, stop and resets ------------------------------------------------------------
    def start(self, calibration: CalibrationState) -> None:
        """Read the prior file or the published prior; raises a one-sentence DisalignError."""
        if self.mode not in (BALANCED, ADAPTIVE):
            self._file_prior = label_shift.read_prior_file(self.mode, calibration.class_names).numpy()
        if self.mode != BALANCED and calibration.meta.target_prior is not None:
            log.warning("the calibration is aligned to a target prior already; DISALIGN_PRIOR=%s does not apply to it", self.mode)
        if self.adaptive and calibration.meta.probability_calibration is None:
            log.warning("the calibration has no probability calibration (fit it with --val): the adaptive prior uses T = 1, b = 0")
        if self.contributes:
            priors.check_writable(self.store)
        if self.adaptive and not self.sources:
            log.info("adaptive prior without DISALIGN_PRIOR_SOURCES: serving the published prior of %s; no traffic moves it", self.store)
        if self.adaptive:
            self._published = self._read_published()
        with self._lock:
            self._reset_locked(calibration)

    def stop(self) -> None:
        """At shutdown: this replica's window no longer counts."""
        if self.contributes:
            priors.remove_traffic(self.store, self.replica)

    def _read_published(self) -> tuple[str, priors.PriorVersion] | None:
        try:
            return priors.read_current(self.store)
        except ArtifactError as exc:
            log.warning("the published prior is not served (balanced until another version is published): %s", exc)
            self._unreadable = priors.pointer(self.store)
            return None

    def _reset_locked(self, calibration: CalibrationState) -> None:
        """Empty windows, no estimate; the state for ``calibration`` (published, file or balanced)."""
        self._generation += 1
        self._requests = 0
        k = calibration.meta.num_classes
        self._windows = TrafficWindows(self.sources, self.window_capacity, k) if self.contributes else None
        self._reference = make_state("reference", np.full(k, 1.0 / k), calibration)  # z / T + b: what the windows hold
        self.last_estimate = None
        self._set_state(self._served_state(calibration), calibration)

    def _served_state(self, calibration: CalibrationState) -> PriorState:
        if self._file_prior is not None:
            return make_state("file", self._file_prior, calibration)
        if self._published is not None:
            version = self._published[1]
            if (version.prior is not None and version.calibration_version == calibration.version
                    and version.classes == calibration.class_names):
                return make_state(version.source, np.asarray(version.prior), calibration)
        return make_state(BALANCED, None, calibration)

    def _set_state(self, state: PriorState, calibration: CalibrationState) -> None:
        self._state = state
        m = self.metrics
        m.info.info({"mode": "file" if self._file_prior is not None else self.mode, "version": state.version,
                     "source": state.source, "frozen": str(self.frozen).lower(),
                     "published": self._published[0] if self._published else ""})
        m.window_rows.set(self._windows.rows if self._windows is not None else 0)
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

    # -- following the published prior (the watcher) ------------------------------------------
    def follow(self) -> bool:
        """Serve a newly published version, if there is one (one readlink when not) → whether it changed."""
        if not self.adaptive:
            return False
        target = priors.pointer(self.store)
        if target is None or target == (self._published[0] if self._published else None) or target == self._unreadable:
            return False
        try:
            found = priors.read_current(self.store)
        except ArtifactError as exc:
            self._unreadable = target
            log.warning("a new prior was published in %s but is not served: %s", self.store, exc)
            return False
        if found is None:
            return False
        self._adopt(found)
        log.info("serving prior %s (%s, published in %s)", self.state.version, found[0], self.store)
        return True

    def _adopt(self, found: tuple[str, priors.PriorVersion]) -> None:
        with self._lock:
            previous = self._published
            self._published = found
            calibration = self._current_calibration()
            if previous is not None and previous[1].epoch != found[1].epoch:  # a reset: no row from before counts again
                self._reset_locked(calibration)
                if self.contributes:
                    priors.remove_traffic(self.store, self.replica)
            else:
                self._set_state(self._served_state(calibration), calibration)

    # -- admin commands -----------------------------------------------------------------------
    def freeze(self, frozen: bool) -> PriorState:
        if self.adaptive:
            state = self.state
            return self._publish_admin(state.prior, frozen=frozen, source=state.source if state.prior is not None else "admin")
        with self._lock:
            self._frozen = frozen
            self._set_state(self.state, self._current_calibration())
            return self.state

    def set_prior(self, values: list[float]) -> PriorState:
        """Serve ``values`` (K,) from now on, frozen (an estimate would replace it otherwise)."""
        calibration = self._current_calibration()
        prior = label_shift.check_prior(values, calibration.meta.num_classes, "prior").numpy()
        if self.adaptive:
            return self._publish_admin(prior, frozen=True, source="admin")
        with self._lock:
            self._generation += 1
            self._frozen = True
            self._set_state(make_state("admin", prior, calibration), calibration)
            return self.state

    def reset(self) -> PriorState:
        """Back to the start: balanced (or the file's prior), unfrozen, no estimate, empty windows — in adaptive
        mode for the whole deployment (a new epoch: no replica's earlier traffic counts again)."""
        if self.adaptive:
            return self._publish_admin(None, frozen=False, source="admin", epoch=priors.new_epoch())
        with self._lock:
            self._frozen = False
            self._reset_locked(self._current_calibration())
            return self.state

    def _publish_admin(self, prior: np.ndarray | None, *, frozen: bool, source: str, epoch: str | None = None) -> PriorState:
        calibration = self._current_calibration()
        try:
            with priors.estimate_lock(self.store, wait_s=ADMIN_LOCK_WAIT_S) as held:
                if not held:
                    raise PriorStoreError(f"another replica held the lock of {self.store} for {ADMIN_LOCK_WAIT_S:g} s; retry.")
                try:
                    current = priors.read_current(self.store)
                except ArtifactError:  # an unreadable version is replaced, and its traffic's epoch with it
                    current, epoch = None, epoch or priors.new_epoch()
                version = priors.PriorVersion(
                    prior=None if prior is None else [float(v) for v in prior], classes=list(calibration.class_names),
                    calibration_version=calibration.version, source=source,
                    epoch=epoch or (current[1].epoch if current else priors.INITIAL_EPOCH), created=priors.now_iso(), frozen=frozen)
                if epoch is not None:
                    priors.clear_traffic(self.store)
                pointer = priors.publish_version(self.store, version)
        except OSError as exc:
            raise PriorStoreError(f"the prior could not be published in {self.store} ({exc.strerror or exc}); "
                                  "its directory must be writable (DISALIGN_PRIOR_DIR).") from None
        self._adopt((pointer, version))
        if epoch is not None:
            with self._lock:
                self._reset_locked(calibration)
            if self.contributes:
                priors.remove_traffic(self.store, self.replica)
        return self.state

    # -- the hot path -------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, use_prior: torch.Tensor | bool, calibration: CalibrationState,
              requests: int = 1, sources: Sequence[tuple[str | None, int]] | None = None) -> tuple[torch.Tensor, PriorState]:
        """Align a batch's calibrated logits (N, K) to the served prior on the rows with ``use_prior`` (N,) and
        keep the rows of trusted requests in their source's window → (logits (N, K) float32, the state used).

        ``sources``: per request of the batch, (trusted source or None, its rows), in row order (None: all
        untrusted). Called once per batch by the runtime, for rows and images alike."""
        state = self._state
        if state is None or (state.offset is None and not self.adaptive):
            return logits, state or make_state(BALANCED, None, calibration)
        if calibration.meta.target_prior is not None:
            return logits, make_state(BALANCED, None, calibration)  # aligned by the artifact itself (module docstring)
        if state.calibration_version != calibration.version:
            if self._current_calibration().version != calibration.version:
                return logits, make_state(BALANCED, None, calibration)  # a batch of the old calibration, after a reload
            state = self._follow_calibration(calibration)  # the first batch of a reloaded calibration
        if self.adaptive:
            self._observe(logits, calibration, sources or [(None, int(logits.shape[0]))])
        if state.offset is None or use_prior is False:
            return logits, state
        adjusted = state.adjust(logits)
        if isinstance(use_prior, torch.Tensor) and not bool(use_prior.all()):
            adjusted = torch.where(use_prior[:, None], adjusted, logits)
        return adjusted, state

    def _follow_calibration(self, calibration: CalibrationState) -> PriorState:
        """Reset if ``calibration`` (the runtime's current one) is not the one the state was made for: a reload."""
        with self._lock:
            if self.state.calibration_version != calibration.version:
                self._reset_locked(calibration)
            return self.state

    def _observe(self, logits: torch.Tensor, calibration: CalibrationState, sources: Sequence[tuple[str | None, int]]) -> None:
        """Count every row by source; keep the trusted ones' balanced probabilities softmax(z / T + b)."""
        rows_metric, windows, trusted, start = self.metrics.rows, self._windows, 0, 0
        for source, n in sources:
            rows_metric.labels(source or UNTRUSTED).inc(n)
            if source is not None and windows is not None:
                part = logits[start:start + n]
                windows.add(source, torch.softmax(self._reference.adjust(part), dim=1).numpy())  # (n, K)
                trusted += 1
            start += n
        if not trusted:
            return
        with self._lock:
            if windows is not self._windows:  # emptied meanwhile (a reset or a reload): these rows do not count
                return
            self._requests += trusted
            due = not self.frozen and not self._estimating and self._requests >= self.update_every
            if due:
                self._estimating = True
                self._requests = 0
                generation, epoch = self._generation, self.epoch
            self.metrics.window_rows.set(windows.rows)
        if due:
            self._estimate_thread = threading.Thread(target=self._estimate, args=(windows.snapshot(), generation, epoch, calibration),
                                                     name="disalign-prior", daemon=True)
            self._estimate_thread.start()

    # -- the estimate (its own thread) --------------------------------------------------------
    def _estimate(self, window: dict[str, np.ndarray], generation: int, epoch: str, calibration: CalibrationState) -> None:
        """Write this replica's window; then, unless another replica is estimating, pool every replica's windows,
        cap each source's share, estimate and publish what passes the checks."""
        try:
            priors.write_traffic(self.store, self.replica, epoch=epoch, calibration_version=calibration.version, windows=window)
            with priors.estimate_lock(self.store) as held:
                if not held:  # another replica is estimating; it pools this window too
                    return
                published = self._estimate_locked(generation, calibration)
            if published is not None:
                self._adopt(published)
        except Exception:  # never let a failed estimate take the server down: the published prior keeps serving
            log.exception("the prior estimate failed; the published prior keeps serving")
            self.metrics.estimates.labels("error").inc()
        finally:
            with self._lock:
                self._estimating = False

    def _estimate_locked(self, generation: int, calibration: CalibrationState) -> tuple[str, priors.PriorVersion] | None:
        current = priors.read_current(self.store)
        version = current[1] if current else None
        applies = version is not None and version.calibration_version == calibration.version
        if applies and version.frozen:
            return current if current != self._published else None
        epoch = version.epoch if version else priors.INITIAL_EPOCH
        k = calibration.meta.num_classes
        pooled, skipped = priors.read_traffic(self.store, epoch=epoch, calibration_version=calibration.version,
                                              num_classes=k, max_age_s=self.traffic_max_age_s)
        for sentence in skipped:
            log.warning("a traffic window is not pooled: %s", sentence)
        pooled = {name: parts for name, parts in pooled.items() if name in self.sources.max_share}  # sources we trust
        allowed = label_shift.capped_counts({n: sum(p.shape[0] for p in parts) for n, parts in pooled.items()},
                                            self.sources.max_share)
        groups = {n: torch.from_numpy(most_recent(pooled[n], allowed[n])) for n in pooled if allowed[n] > 0}
        rows = sum(g.shape[0] for g in groups.values())
        if rows < self.min_rows:
            return None
        current_prior = torch.tensor(version.prior, dtype=torch.float64) if applies and version.prior is not None else None
        update = label_shift.next_prior(groups, current_prior, max_step=self.max_step)
        estimate = Estimate(update.target.tolist(), update.statistic, update.p_value, update.adapt, rows, time.time(),
                            {n: int(g.shape[0]) for n, g in groups.items()}, update.changed, update.reason)
        with self._lock:
            if generation != self._generation:
                return None  # the windows were emptied meanwhile (a reset or a reload)
            self.last_estimate = estimate
            self.metrics.estimates.labels("publish" if update.changed else "keep").inc()
            self._set_state(self.state, calibration)
        if not update.changed:
            return None
        new = priors.PriorVersion(
            prior=None if update.prior is None else update.prior.tolist(), classes=list(calibration.class_names),
            calibration_version=calibration.version, source="estimate", epoch=epoch, created=priors.now_iso(),
            rows=rows, rows_by_source=estimate.rows_by_source, test=update_record(update, self.max_step))
        return priors.publish_version(self.store, new), new

    def wait_for_estimate(self, timeout: float = 10.0) -> None:
        """Block until the running estimate (if any) has finished (tests and benchmarks)."""
        thread = self._estimate_thread
        if thread is not None:
            thread.join(timeout)

    def status(self) -> dict:
        """What ``/admin/prior`` answers (balanced for a runtime that never started it: a dense model)."""
        started = self._state is not None
        state = self._follow_calibration(self._current_calibration()) if started else PriorState(BALANCED, BALANCED, None, "")
        estimate = self.last_estimate
        windows = self._windows
        published = self._published
        return {"mode": "file" if self._file_prior is not None else self.mode, "version": state.version, "source": state.source,
                "frozen": self.frozen, "prior": state.prior.tolist() if state.prior is not None else None,
                "window_rows": windows.rows if windows is not None else 0,
                "window_capacity": windows.capacity if windows is not None else 0,
                "sources": windows.counts() if windows is not None else {},
                "estimate": None if estimate is None else dataclasses.asdict(estimate),
                "published": None if published is None else {
                    "pointer": published[0], "source": published[1].source, "created": published[1].created,
                    "calibration_version": published[1].calibration_version, "epoch": published[1].epoch,
                    "rows": published[1].rows, "rows_by_source": published[1].rows_by_source, "frozen": published[1].frozen}}


def update_record(update: label_shift.PriorUpdate, max_step: float) -> dict:
    """What a published version records of the decision behind it (``prior.json``'s ``test``)."""
    return {"statistic": update.statistic, "p_value": update.p_value, "stepped": update.stepped, "max_step": max_step,
            "reason": update.reason, "target": update.target.tolist(),
            "sources": {name: {"prior": e.prior.tolist(), "p_value": e.p_value, "adapt": e.adapt, "rows": e.num_samples}
                        for name, e in update.estimates.items()}}


def most_recent(parts: list[np.ndarray], keep: int) -> np.ndarray:
    """``keep`` rows from one source's windows (one per replica, each oldest first): the most recent of each,
    in proportion to its size."""
    total = sum(p.shape[0] for p in parts)
    if keep >= total:
        return np.concatenate(parts)
    if keep <= 0:
        return parts[0][:0]
    takes = [int(keep * p.shape[0] // total) for p in parts]
    for i in np.argsort([-p.shape[0] for p in parts])[:keep - sum(takes)]:  # the rounding remainder
        takes[i] += 1
    return np.concatenate([p[p.shape[0] - t:] for p, t in zip(parts, takes, strict=True)])
