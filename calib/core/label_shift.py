"""Label shift: align a balanced calibration to the class prior of the traffic it is deployed into.

DisAlign aligns a biased classifier to a *balanced* reference distribution, p_bal(y|x). When the
deployment has another class prior π (label shift: p(x|y) unchanged), Bayes' rule gives

    p_π(y|x) ∝ p_bal(y|x) · π_y / π_ref,y          (π_ref: the reference prior, uniform for DisAlign)

so the adapted logits are the calibrated logits plus log π (up to a constant). When π is unknown it is
estimated from unlabeled inputs by maximum likelihood with the EM procedure of Saerens, Latinne and
Decaestecker (2002), "Adjusting the outputs of a classifier to new a priori probabilities: a simple
procedure", Neural Computation 14(1). The estimate is only as good as the calibration of p_bal:
Alexandari, Kundaje and Shrikumar (ICML 2020), "Maximum likelihood with bias-corrected calibration is
hard-to-beat at label shift adaptation", fit a temperature T and per-class biases b on held-out
labelled data first (bias-corrected temperature scaling, BCTS):

    p_bal(y|x) = softmax(z / T + b)_y               (z: the calibrated logits of any method)

Two guards keep the estimate sane where the plain procedure is not:

- a Dirichlet prior on π centred on the reference (maximum a posteriori EM, as in MAPLS: Ye et al.,
  "Label shift estimation for class-imbalance problem: a Bayesian approach", WACV 2024): ``concentration``
  pseudo-counts spread as π_ref, so a class missing from the traffic gets a small positive prior, never
  0, and log π is always finite;
- a likelihood-ratio test of the estimate against the reference: adapt only when the traffic's prior
  differs significantly. Λ = 2 Σ_i log Σ_y p_bal(y|x_i) π_y / π_ref,y is asymptotically χ²(K−1) under
  the reference *if the probabilities are calibrated on the traffic*. They never are exactly: a val bank
  of a few hundred rows leaves a miscalibration that makes Λ grow linearly with N even on balanced
  traffic (measured on CIFAR-10-LT IR50: Λ/N ≈ 0.005–0.007 on balanced test sets, 0.03 at imbalance 2,
  0.29 at 10). So the test allows ``tolerance`` nats of log-likelihood gain per row before it counts
  any: it rejects the reference when Λ − 2·N·tolerance exceeds the χ²(K−1) quantile at ``significance``.
  With the MAP estimate in place of the maximum-likelihood one, Λ is a lower bound (conservative).

Shapes: logits (N, K), probabilities (N, K) rows summing to 1, priors (K,) summing to 1. Everything here is
a pure function over tensors (computations in float64), except :func:`read_prior_file`, the reader of the
prior-file format that ``disalign adapt --json`` writes and ``eval --target-prior`` and the server read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from disalign.calib import json_text
from disalign.calib.data.bank import clean_labelled_rows
from disalign.calib.defaults import PRIOR_CONCENTRATION, PRIOR_SIGNIFICANCE, PRIOR_TOLERANCE
from disalign.calib.errors import InputError
from disalign.calib.files import read_regular_file

DEFAULT_BIAS_PENALTIES = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge on b, chosen by cross-validation
# Dirichlet pseudo-counts, the test's level, and the nats per row that miscalibration may explain (module
# docstring); in disalign.calib.defaults so that the command line's parser can show them without importing torch
DEFAULT_CONCENTRATION, DEFAULT_SIGNIFICANCE, DEFAULT_TOLERANCE = PRIOR_CONCENTRATION, PRIOR_SIGNIFICANCE, PRIOR_TOLERANCE
EM_TOLERANCE = 1e-7  # stop when no class prior moves by more than this
EM_MAX_ITERATIONS = 2000
MIN_CALIBRATION_ROWS = 20  # fewer labelled val rows: no probability calibration is fitted
# Fewer labelled rows per class than this: only the temperature is fitted. K biases from under 20 rows each
# are noise (already at 20 per class the cross-validation picks the largest ridge, b ≈ 0, on CIFAR-10-LT),
# and cross-validating them costs 31 L-BFGS fits over (N, K) logits: minutes at K = 1000.
BIAS_MIN_ROWS_PER_CLASS = 20
MAX_CALIBRATION_ROWS = 50_000  # a random subset of larger val banks (pixel banks) is plenty for K + 1 parameters
MAX_PRIOR_FILE_BYTES = 64 * 2**20  # K numbers and K names: a few MB at the largest K we know
PRIOR_FLOOR = 1e-12  # a prior of 0 becomes this, so that adjusted logits stay finite
# What a stored probability calibration may hold (checked on read, and what a fit returns). Serving computes
# z / T + b + log π in float32: T = 1e-300 or b = 1e300 are valid floats that overflow it on every row. The
# temperature range is fit_temperature's own bracket for 1 / T; biases are log-odds, and ±1000 nats is
# already a certainty no calibration needs (fitted ones stay within ±10 on our banks).
TEMPERATURE_RANGE = (1e-4, 1e4)
MAX_ABS_BIAS = 1e3
# The level at which a new estimate must beat the prior served now to replace it (next_prior). Looser than the
# test against the balanced reference (1e-3), which guards against adapting at all: here both candidates are
# already estimates. At 1e-3, a 2,000-row window of CIFAR-10-LT IR10 traffic kept a first 500-row estimate
# (L1 0.16 from the truth) against later ones at 0.10 (p = 0.009); a level of 0.01 publishes that one.
CHANGE_SIGNIFICANCE = 1e-2


@dataclass(frozen=True)
class ProbabilityCalibration:
    """Bias-corrected temperature scaling p = softmax(z / T + b), fitted on a labelled held-out bank.

    ``bias_penalty``: the ridge weight on b chosen by cross-validation (a large value means the held-out
    bank could not support per-class biases, and b ≈ 0: plain temperature scaling); None when the bank had
    too few rows per class to try (b = 0).
    """

    temperature: float
    bias: tuple[float, ...]  # (K,)
    bias_penalty: float | None = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.bias)

    def to_json(self) -> dict:
        return {"temperature": self.temperature, "bias": list(self.bias), "bias_penalty": self.bias_penalty}

    @classmethod
    def from_json(cls, raw: dict) -> ProbabilityCalibration:
        """From the artifact's ``probability_calibration`` object (checked on read with the rest of the artifact)."""
        penalty = raw.get("bias_penalty", 0.0)
        return cls(float(raw["temperature"]), tuple(float(v) for v in raw["bias"]), None if penalty is None else float(penalty))


@dataclass(frozen=True)
class PriorEstimate:
    """What :func:`estimate_prior` found on N unlabeled rows.

    prior (K,): the MAP estimate; statistic: Λ of the likelihood-ratio test against the reference;
    p_value: P(χ²(K−1) ≥ Λ − 2·N·tolerance); adapt: whether that is below ``significance``.
    """

    prior: torch.Tensor
    reference: torch.Tensor
    num_samples: int
    iterations: int
    converged: bool
    statistic: float
    p_value: float
    significance: float
    tolerance: float

    @property
    def adapt(self) -> bool:
        return self.p_value < self.significance

    @property
    def applied(self) -> torch.Tensor:
        """The prior to apply: the estimate when the test rejects the reference, else the reference itself."""
        return self.prior if self.adapt else self.reference


def prior_logits(logits: torch.Tensor, target_prior: list[float], probability_calibration: dict | None) -> torch.Tensor:
    """The logits (N, K) float32 of a calibration aligned to ``target_prior`` (the artifact's fields)."""
    calibration = ProbabilityCalibration.from_json(probability_calibration) if probability_calibration else None
    return adjust_to_prior(logits, torch.tensor(target_prior, dtype=torch.float64), calibration).float()


def calibration_rows(view: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Indices of the clean labelled rows (view 0, label >= 0) of a val bank to fit the probability
    calibration on: all of them, or a random :data:`MAX_CALIBRATION_ROWS` of them (sorted)."""
    rows = torch.nonzero(clean_labelled_rows(view, labels)).squeeze(1)
    if rows.numel() <= MAX_CALIBRATION_ROWS:
        return rows
    pick = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed))[:MAX_CALIBRATION_ROWS]
    return rows[pick.sort().values]


# -- calibration of probabilities --------------------------------------------------------------------
def calibrated_logits(logits: torch.Tensor, calibration: ProbabilityCalibration | None) -> torch.Tensor:
    """z / T + b (N, K) float64; ``None`` is the identity (T = 1, b = 0)."""
    z = logits.double()
    if calibration is None:
        return z
    bias = torch.tensor(calibration.bias, dtype=torch.float64)
    return z / calibration.temperature + bias


def temperature_bias_nll(logits: torch.Tensor, labels: torch.Tensor, log_t: float, bias: torch.Tensor,
                         buffer: torch.Tensor | None = None) -> tuple[float, float, torch.Tensor]:
    """Mean NLL of softmax(z·e^(−t) + b) and its gradients with respect to t = log T and b, by hand.

    logits (N, K) float32, labels (N,) int64, bias (K,) float64 → (nll, d/dt, d/db (K,) float64). The (N, K)
    passes run in float32 in one buffer (``buffer``, (N, K) float32, reused across calls if given: a fresh
    one per call costs its page faults), reductions over rows and classes in float32 and the rest in
    float64: no autograd graph, no (N, K) float64 copies (at K = 1000 these made the cross-validated fit
    take minutes).
    """
    n = logits.shape[0]
    inv_t = math.exp(-log_t)
    x = torch.empty_like(logits) if buffer is None else buffer
    torch.add(bias.float(), logits, alpha=inv_t, out=x)  # (N, K): z·e^(−t) + b
    x.sub_(x.amax(dim=1, keepdim=True))
    shifted_picked = x.gather(1, labels[:, None]).squeeze(1).double()
    x.exp_()
    total = x.sum(dim=1).double()  # Σ_k e^(x_k − m) (a float32 sum: summing in float64 is 20× slower on CPU)
    nll = float((torch.log(total) - shifted_picked).mean())
    x.div_(total.float()[:, None])  # P (N, K)
    grad_bias = x.sum(dim=0).double() / n - torch.bincount(labels, minlength=logits.shape[1]).double() / n
    # dx/dt = −z·e^(−t): dL/dt = −e^(−t)·mean_i (Σ_k P_ik z_ik − z_i,y_i)
    expected_z = x.mul_(logits).sum(dim=1).double()
    observed_z = logits.gather(1, labels[:, None]).squeeze(1).double()  # z_y
    grad_t = -inv_t * float((expected_z - observed_z).mean())
    return nll, grad_t, grad_bias


def fit_temperature_bias(logits: torch.Tensor, labels: torch.Tensor, bias_penalty: float = 0.0, *,
                         start: tuple[float, torch.Tensor] | None = None) -> tuple[float, torch.Tensor]:
    """BCTS: (T, b (K,)) minimising mean NLL(softmax(z / T + b), y) + bias_penalty · ‖b‖² (L-BFGS over
    float64 parameters, minimised over log T so that T stays positive; the loss by :func:`temperature_bias_nll`).

    logits (N, K) float, labels (N,) int64 in 0..K−1; ``start``: (T, b) to start from (default T = 1, b = 0).
    """
    z, y = logits.detach().float().contiguous(), labels.detach()
    params = torch.zeros(1 + z.shape[1], dtype=torch.float64)  # [log T, b]
    if start is not None:
        params[0], params[1:] = math.log(start[0]), start[1]
    params.grad = torch.zeros_like(params)
    buffer = torch.empty_like(z)
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=100, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        nll, grad_t, grad_bias = temperature_bias_nll(z, y, float(params[0]), params[1:], buffer)
        params.grad[0] = grad_t
        params.grad[1:] = grad_bias + 2 * bias_penalty * params[1:]
        return torch.tensor(nll + bias_penalty * float(params[1:].square().sum()), dtype=torch.float64)

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE  # a degenerate bank (separable, one class) can send log T or b off to infinity
    return float(params[0].exp().clamp(low, high)), params[1:].clamp(-MAX_ABS_BIAS, MAX_ABS_BIAS)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, tolerance: float = 1e-8, max_iterations: int = 100) -> float:
    """Temperature scaling: T minimising mean NLL(softmax(z / T), y), by safeguarded Newton on β = 1/T.

    logits (N, K) float, labels (N,) int64. The NLL is convex in β (a log-sum-exp of functions linear in β
    minus a linear one): f'(β) = mean_i(E_P[z_i] − z_i,y), f''(β) = mean_i Var_P(z_i) ≥ 0. Newton steps that
    leave the bracket where f' changes sign are replaced by bisection; β stays in [1e-4, 1e4].
    """
    z, y = logits.detach().float().contiguous(), labels.detach()
    observed = z.gather(1, y[:, None]).squeeze(1).double().mean()
    buffer = torch.empty_like(z)

    def derivatives(beta: float) -> tuple[float, float]:
        x = torch.mul(z, beta, out=buffer)
        x.sub_(x.amax(dim=1, keepdim=True)).exp_()
        total = x.sum(dim=1).double()
        mean_z = x.mul_(z).sum(dim=1).double() / total
        mean_z2 = x.mul_(z).sum(dim=1).double() / total
        return float(mean_z.mean() - observed), float((mean_z2 - mean_z.square()).clamp_min(0).mean())

    low, high, beta = 1e-4, 1e4, 1.0
    for _ in range(max_iterations):
        slope, curvature = derivatives(beta)
        if abs(slope) < tolerance:
            break
        low, high = (beta, high) if slope < 0 else (low, beta)
        step = beta - slope / curvature if curvature > 0 else math.nan
        previous, beta = beta, (step if low < step < high else math.sqrt(low * high))  # else bisection in log space
        if abs(beta - previous) < 1e-7 * previous:  # float32 passes: the slope itself is only this exact
            break
    return 1.0 / beta


def fit_probability_calibration(logits: torch.Tensor, labels: torch.Tensor, *,
                                bias_penalties: tuple[float, ...] = DEFAULT_BIAS_PENALTIES,
                                folds: int = 5, seed: int = 0) -> ProbabilityCalibration:
    """BCTS on a labelled held-out bank, the ridge on b chosen by ``folds``-fold cross-validated NLL.

    logits (N, K) (the calibrated logits of any method on the val bank), labels (N,) in 0..K−1. A val bank
    of a few hundred rows cannot pin down K biases (Alexandari et al. fit them on thousands); the
    cross-validation then picks a large penalty and b ≈ 0, i.e. plain temperature scaling.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise InputError(f"logits should be (N, K) and labels (N,), found {tuple(logits.shape)} and {tuple(labels.shape)}.")
    n = logits.shape[0]
    if n < 2 * folds:
        raise InputError(f"the probability calibration needs at least {2 * folds} labelled rows, found {n}.")
    if n < BIAS_MIN_ROWS_PER_CLASS * logits.shape[1]:
        return ProbabilityCalibration(fit_temperature(logits, labels), (0.0,) * logits.shape[1], None)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = order.chunk(folds)
    totals = {}
    starts: list[tuple[float, torch.Tensor] | None] = [None] * len(parts)
    # Strongest ridge first, each fold's fit starting from its solution at the previous (stronger) ridge:
    # a path of nearby optima, which L-BFGS reaches in a few iterations each.
    for penalty in sorted(bias_penalties, reverse=True):
        total = 0.0
        for index, held in enumerate(parts):
            train = torch.ones(n, dtype=torch.bool)
            train[held] = False
            t, b = fit_temperature_bias(logits[train], labels[train], penalty, start=starts[index])
            starts[index] = (t, b)
            total += float(F.cross_entropy(logits[held].double() / t + b, labels[held], reduction="sum"))
        totals[penalty] = total
    best_penalty, best_nll = bias_penalties[0], math.inf
    for penalty in bias_penalties:
        if totals[penalty] < best_nll - 1e-9:  # ties → the smaller penalty, listed first
            best_penalty, best_nll = penalty, totals[penalty]
    temperature, bias = fit_temperature_bias(logits, labels, best_penalty)
    return ProbabilityCalibration(temperature, tuple(bias.tolist()), best_penalty)


# -- estimating the prior ----------------------------------------------------------------------------
def check_prior(prior: torch.Tensor | list[float], num_classes: int, what: str) -> torch.Tensor:
    """A prior (K,) of finite non-negative numbers with a positive sum → normalised float64 tensor."""
    p = torch.as_tensor(prior, dtype=torch.float64)
    if p.shape != (num_classes,):
        raise InputError(f"{what} should have {num_classes} values (one per class), found shape {tuple(p.shape)}.")
    if not torch.isfinite(p).all() or (p < 0).any() or float(p.sum()) <= 0:
        raise InputError(f"{what} should hold finite numbers >= 0 with a positive sum.")
    total = float(p.sum())
    if not math.isfinite(total):  # [1e308] * 10: each finite, the sum not; p / sum would be all zeros
        raise InputError(f"{what} should hold finite numbers >= 0 with a positive, finite sum; found a sum of {total}.")
    return p / total


def uniform_prior(num_classes: int) -> torch.Tensor:
    return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)


def em_prior(probabilities: torch.Tensor, reference: torch.Tensor, *, concentration: float = DEFAULT_CONCENTRATION,
             tolerance: float = EM_TOLERANCE, max_iterations: int = EM_MAX_ITERATIONS,
             start: torch.Tensor | None = None) -> tuple[torch.Tensor, int, bool]:
    """MAP-EM for the class prior of the rows (Saerens et al. 2002, with a Dirichlet prior).

    probabilities (N, K): p_ref(y|x), calibrated for the reference prior ``reference`` (K,). Iterates

        E: w_iy = p_iy π_y / π_ref,y  /  Σ_k p_ik π_k / π_ref,k
        M: π_y  = (Σ_i w_iy + A · π_ref,y) / (N + A)       (Dirichlet α_y = 1 + A · π_ref,y)

    with A = ``concentration`` (0: plain maximum likelihood). → (π (K,), iterations, converged).
    Σ_i w_iy = π_y · Σ_i (p_iy / π_ref,y) / d_i with d = (p / π_ref) π: two matrix-vector products per
    iteration, in numpy (torch's thread pool costs more than these small products on a busy machine).
    """
    ratio = (probabilities.double() / reference.double()).numpy()  # (N, K): p_iy / π_ref,y, fixed
    ref = reference.double().numpy()
    prior = (start if start is not None else reference).double().numpy().copy()
    n = ratio.shape[0]
    for iteration in range(1, max_iterations + 1):
        mixture = np.maximum(ratio @ prior, 1e-300)  # (N,): d_i
        new = (prior * (ratio.T @ (1.0 / mixture)) + concentration * ref) / (n + concentration)
        moved = float(np.abs(new - prior).max())
        prior = new
        if moved < tolerance:
            return torch.from_numpy(prior), iteration, True
    return torch.from_numpy(prior), max_iterations, False


def likelihood_ratio(probabilities: torch.Tensor, prior: torch.Tensor, reference: torch.Tensor) -> float:
    """Λ = 2 Σ_i log Σ_y p_iy π_y / π_ref,y ≥ 0: twice the log-likelihood of the unlabeled rows under π
    relative to the reference (the terms that do not depend on the prior cancel)."""
    mixture = (probabilities.double() * (prior / reference)).sum(dim=1).clamp_min(1e-300)  # (N,)
    return max(0.0, 2.0 * float(mixture.log().sum()))


def chi2_survival(x: float, dof: int) -> float:
    """P(χ²(dof) ≥ x): the regularised upper incomplete gamma function Q(dof/2, x/2)."""
    if dof < 1 or x <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)))


def estimate_prior(probabilities: torch.Tensor, reference: torch.Tensor | None = None, *,
                   concentration: float = DEFAULT_CONCENTRATION, significance: float = DEFAULT_SIGNIFICANCE,
                   tolerance: float = DEFAULT_TOLERANCE) -> PriorEstimate:
    """Estimate the class prior of N unlabeled rows (MAP-EM) and test it against the reference.

    probabilities (N, K): calibrated p_ref(y|x) of the rows (rows summing to 1, finite);
    reference (K,): the prior the probabilities are calibrated for (default uniform).
    """
    if probabilities.ndim != 2 or probabilities.shape[0] < 1:
        raise InputError(f"probabilities should have shape (N, K) with N >= 1, found {tuple(probabilities.shape)}.")
    if not torch.isfinite(probabilities).all() or (probabilities < 0).any():
        raise InputError("probabilities should be finite and non-negative; found NaN, inf or a negative value.")
    if concentration < 0 or not math.isfinite(concentration):
        raise InputError(f"concentration should be a finite number >= 0, found {concentration}.")
    if not 0 < significance < 1:
        raise InputError(f"significance should be between 0 and 1, found {significance}.")
    if tolerance < 0 or not math.isfinite(tolerance):
        raise InputError(f"tolerance should be a finite number >= 0 (nats per row), found {tolerance}.")
    n, k = probabilities.shape
    ref = uniform_prior(k) if reference is None else check_prior(reference, k, "the reference prior")
    prior, iterations, converged = em_prior(probabilities, ref, concentration=concentration)
    statistic = likelihood_ratio(probabilities, prior, ref)
    p_value = chi2_survival(statistic - 2.0 * n * tolerance, k - 1)
    return PriorEstimate(prior, ref, n, iterations, converged, statistic, p_value, significance, tolerance)


def bootstrap_interval(probabilities: torch.Tensor, estimate: PriorEstimate, *, resamples: int = 100, level: float = 0.95,
                       concentration: float = DEFAULT_CONCENTRATION, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval of each class prior: rows resampled with replacement ``resamples`` times,
    EM rerun from the estimate → (low (K,), high (K,)) at confidence ``level``."""
    if resamples < 1:
        raise InputError(f"resamples should be >= 1, found {resamples}.")
    generator = torch.Generator().manual_seed(seed)
    n = probabilities.shape[0]
    draws = []
    for _ in range(resamples):
        rows = torch.randint(n, (n,), generator=generator)
        prior, _, _ = em_prior(probabilities[rows], estimate.reference, concentration=concentration, start=estimate.prior)
        draws.append(prior)
    stacked = torch.stack(draws)  # (B, K)
    tail = (1.0 - level) / 2
    return torch.quantile(stacked, tail, dim=0), torch.quantile(stacked, 1.0 - tail, dim=0)


# -- moving a served prior: who may move it, how far, and when ------------------------------------------
@dataclass(frozen=True)
class PriorUpdate:
    """What :func:`next_prior` decided for a served prior, from the rows of the traffic by source.

    prior (K,): the prior to serve next, None for balanced; changed: whether that differs from ``current``;
    target (K,): the share-weighted mean of the sources' priors; estimates: each source's MAP estimate and its
    test against the balanced reference; statistic, p_value: the test of the target against ``current``;
    stepped: the move was cut to ``max_step``.
    """

    prior: torch.Tensor | None
    changed: bool
    target: torch.Tensor
    estimates: dict[str, PriorEstimate]
    statistic: float
    p_value: float
    stepped: bool
    reason: str

    @property
    def adapt(self) -> bool:
        """Whether any source's rows reject the balanced reference."""
        return any(e.adapt for e in self.estimates.values())


def capped_counts(counts: dict[str, int], max_share: dict[str, float]) -> dict[str, int]:
    """Rows each source may contribute so that no source holds more than its ``max_share`` of the rows kept.

    Source s keeps k_s(T) = min(n_s, ⌊c_s·T⌋) rows (``counts`` n_s, shares c_s in (0, 1]; its most recent, in
    the caller's order) for the largest whole T with Σ_s k_s(T) ≥ T: then k_s ≤ c_s·T ≤ c_s·Σ k. Without the
    floors, g(T) = Σ_s min(n_s, c_s·T) − T is concave with g(0) = 0, so its largest root is found by bisection;
    the floors cost at most a row per source, so T steps down from that root to the first T that holds. One
    source with c < 1 can contribute nothing on its own: a share is a share of what the others send too.
    """
    def kept(total: int) -> dict[str, int]:
        return {s: int(min(n, math.floor(max_share[s] * total + 1e-9))) for s, n in counts.items()}

    def gain(total: float) -> float:
        return sum(min(n, max_share[s] * total) for s, n in counts.items()) - total

    low, high = 0, sum(counts.values())
    if gain(high) >= -1e-9:
        low = high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if gain(middle) >= -1e-9 else (low, middle)
    while low > 0 and sum(kept(low).values()) < low:
        low -= 1
    return kept(low)


def step_toward(current: torch.Tensor, target: torch.Tensor, max_step: float) -> tuple[torch.Tensor, bool]:
    """``current`` moved toward ``target`` (both (K,), summing to 1) by at most ``max_step`` in L1 → (prior, cut?).

    A convex combination, so it stays a prior and never overshoots the target."""
    distance = l1_distance(current, target)
    if distance <= max_step:
        return target.double(), False
    w = max_step / distance
    return (1.0 - w) * current.double() + w * target.double(), True


def log_likelihood_ratio(probabilities: torch.Tensor, prior: torch.Tensor, other: torch.Tensor,
                         reference: torch.Tensor | None = None) -> float:
    """2 Σ_i log (Σ_y p_iy π_y / π_ref,y) / (Σ_y p_iy π'_y / π_ref,y): how much better ``prior`` explains the
    rows than ``other`` (negative when worse); probabilities (N, K) calibrated for ``reference`` (uniform)."""
    k = probabilities.shape[1]
    ref = uniform_prior(k) if reference is None else reference.double()
    p = probabilities.double()
    a = (p * (prior.double() / ref)).sum(dim=1).clamp_min(1e-300)
    b = (p * (other.double() / ref)).sum(dim=1).clamp_min(1e-300)
    return 2.0 * float((a.log() - b.log()).sum())


def next_prior(sources: dict[str, torch.Tensor], current: torch.Tensor | None, *, max_step: float,
               concentration: float = DEFAULT_CONCENTRATION, significance: float = DEFAULT_SIGNIFICANCE,
               tolerance: float = DEFAULT_TOLERANCE, change_significance: float = CHANGE_SIGNIFICANCE) -> PriorUpdate:
    """The prior to serve after ``current`` (K,) (None: balanced), from trusted traffic: per source, its rows'
    balanced probabilities (n_s, K), each source already capped at its share of the rows (:func:`capped_counts`).

    1. the target: each source's own prior — its MAP estimate if its own likelihood-ratio test rejects the
       balanced reference, else the reference (:func:`estimate_prior`) — averaged with the sources' shares of
       the rows as weights. Label shift of a mix of populations is the mix of their priors, and a source with
       share w moves the target by at most w·‖π_s − π_rest‖₁ ≤ 2w, whatever its rows: its rows never tip a
       test that applies the *other* sources' estimation noise (measured on the CIFAR-10-LT test bank: one
       test on the pooled rows let 5 % of class-0 rows lower honest accuracy by 0.9 points against the 0.1
       their share accounts for — the honest rows' own noisy estimate, applied once the pooled test rejected);
    2. significance: move only if the target explains the pooled rows significantly better than ``current``
       (Λ against χ²(K−1) at ``change_significance``). Without the miscalibration allowance of step 1: it is
       there because a miscalibrated p_bal makes Λ against the reference grow with N even on balanced traffic,
       and between two priors scored on the same probabilities that error is common to both (with it, a
       2,000-row window kept a 500-row estimate 0.16 from the true prior against estimates 0.07–0.1 from it);
    3. a bounded step: at most ``max_step`` in L1 towards the target (:func:`step_toward`), so that no single
       window moves the served prior further than that.

    A result within 1e-9 of uniform, reached by stepping to a uniform target, is balanced (None).
    """
    if not 0 < max_step <= 2:
        raise InputError(f"max_step should be in (0, 2] (an L1 distance between priors), found {max_step}.")
    groups = {name: rows for name, rows in sources.items() if rows.shape[0] > 0}
    if not groups:
        raise InputError("next_prior needs rows from at least one source.")
    k = next(iter(groups.values())).shape[1]
    uniform = uniform_prior(k)
    estimates = {name: estimate_prior(rows, concentration=concentration, significance=significance, tolerance=tolerance)
                 for name, rows in groups.items()}
    total = sum(rows.shape[0] for rows in groups.values())
    target = sum((rows.shape[0] / total) * (estimates[name].prior if estimates[name].adapt else uniform)
                 for name, rows in groups.items())
    adapt = any(e.adapt for e in estimates.values())
    pooled = torch.cat(list(groups.values()))
    start = uniform if current is None else check_prior(current, k, "the current prior")
    statistic = log_likelihood_ratio(pooled, target, start)
    p_value = chi2_survival(statistic, k - 1)

    def update(prior, changed, stepped, reason):
        return PriorUpdate(prior, changed, target, estimates, statistic, p_value, stepped, reason)

    if current is None and not adapt:
        return update(None, False, False, "the traffic is balanced")
    if p_value >= change_significance:
        return update(current, False, False, f"not significantly better than the current prior (p = {p_value:.3g})")
    moved, stepped = step_toward(start, target, max_step)
    if not adapt and l1_distance(moved, uniform) < 1e-9:
        return update(None, current is not None, stepped, "back to balanced")
    return update(moved, True, stepped, "a step of at most the bound" if stepped else "the target")


# -- applying a prior --------------------------------------------------------------------------------
def adjust_to_prior(logits: torch.Tensor, prior: torch.Tensor, calibration: ProbabilityCalibration | None,
                    reference: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (N, K) float64 of p_π(y|x) ∝ p_ref(y|x) · π_y / π_ref,y, p_ref = softmax(z / T + b).

    logits (N, K): the calibrated logits z of any method; prior (K,) may hold zeros: they are floored at
    :data:`PRIOR_FLOOR`, so the logits stay finite and such a class is practically never predicted.
    """
    k = logits.shape[1]
    target = check_prior(prior, k, "the target prior").clamp_min(PRIOR_FLOOR)
    ref = uniform_prior(k) if reference is None else check_prior(reference, k, "the reference prior")
    return calibrated_logits(logits, calibration) + target.log() - ref.log()


def read_prior_file(path: str | Path, class_names: list[str]) -> torch.Tensor:
    """A prior file → normalised prior (K,) float64; one sentence for any fault.

    The format (what ``disalign adapt --json`` writes, ``eval --target-prior`` and ``DISALIGN_PRIOR`` read):
    ``{"prior": [K numbers >= 0], "classes": [K names], ...}`` (``classes`` optional), or a bare list of K numbers.
    """
    path = Path(path)
    try:
        raw = json_text.loads(read_regular_file(path, InputError, max_bytes=MAX_PRIOR_FILE_BYTES), f"prior file {path}", InputError)
    except FileNotFoundError:
        raise InputError(f"prior file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"prior file {path} is not readable JSON ({exc}).") from None
    values = raw.get("prior") if isinstance(raw, dict) else raw
    if isinstance(raw, dict) and "classes" in raw and raw["classes"] != class_names:
        raise InputError(f"prior file {path}: 'classes' should be the calibration's class names {class_names[:3]}…, found {raw['classes']!r:.80}.")
    if not isinstance(values, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise InputError(f"prior file {path} should hold a list of {len(class_names)} numbers or an object with a 'prior' list.")
    return check_prior(values, len(class_names), f"prior file {path}: the prior")


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ_y |a_y − b_y| of two priors (K,): 0 for equal priors, 2 for disjoint ones."""
    return float((a.double() - b.double()).abs().sum())


__all__ = [
    "PriorEstimate",
    "PriorUpdate",
    "ProbabilityCalibration",
    "adjust_to_prior",
    "bootstrap_interval",
    "calibrated_logits",
    "calibration_rows",
    "capped_counts",
    "check_prior",
    "chi2_survival",
    "em_prior",
    "estimate_prior",
    "fit_probability_calibration",
    "fit_temperature_bias",
    "l1_distance",
    "likelihood_ratio",
    "log_likelihood_ratio",
    "next_prior",
    "prior_logits",
    "read_prior_file",
    "step_toward",
    "uniform_prior",
]
