"""Label-shift math (disalign.calib.core.label_shift): EM against hand-computed and independently optimised answers,
BCTS recovering known temperatures and biases, the likelihood-ratio test, the artifact fields, and the
whole procedure on the real CIFAR-10-LT IR50 banks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from disalign.calib.artifact.format import check_label_shift_fields
from disalign.calib.artifact.publish import artifact_dir
from disalign.calib.core import label_shift as ls
from disalign.calib.errors import ArtifactError, InputError
from disalign.calib.estimators.methods import load_calibration
from tests.conftest import REPO

EXAMPLES = REPO / "examples" / "cifar10lt"


def gaussian_traffic(prior: np.ndarray, n: int, seed: int, separation: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a 2-d Gaussian mixture (unit variance, class means on a circle) with labels drawn from ``prior``;
    → (exact balanced posteriors (n, K), labels (n,)): perfectly calibrated probabilities for the uniform reference."""
    rng = np.random.default_rng(seed)
    k = prior.size
    angles = 2 * np.pi * np.arange(k) / k
    means = separation * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (K, 2)
    labels = rng.choice(k, size=n, p=prior / prior.sum())
    x = means[labels] + rng.normal(size=(n, 2))
    log_lik = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)  # (n, K)
    return torch.softmax(torch.from_numpy(log_lik), dim=1), torch.from_numpy(labels)


def long_tail(k: int, imbalance: float) -> np.ndarray:
    p = imbalance ** (-np.arange(k) / (k - 1))
    return p / p.sum()


# -- EM ---------------------------------------------------------------------------------------------
def test_em_on_one_hot_rows_is_the_smoothed_frequency():
    # One-hot rows: the posterior weights are the rows themselves, so EM stops at (counts + A·π_ref) / (N + A).
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    rows = torch.nn.functional.one_hot(labels, 4).double()
    prior, _, converged = ls.em_prior(rows, ls.uniform_prior(4), concentration=2.0)
    assert converged
    assert prior.tolist() == pytest.approx([(3 + 0.5) / 8, (1 + 0.5) / 8, (2 + 0.5) / 8, 0.5 / 8])
    mle, _, _ = ls.em_prior(rows, ls.uniform_prior(4), concentration=0.0)
    assert mle.tolist() == pytest.approx([0.5, 1 / 6, 1 / 3, 0.0])


def test_em_matches_an_independent_maximum_likelihood():
    probabilities, _ = gaussian_traffic(long_tail(5, 10.0), 3000, seed=0)
    prior, _, converged = ls.em_prior(probabilities, ls.uniform_prior(5), concentration=0.0, tolerance=1e-10)
    assert converged

    p = probabilities.numpy()

    def negative_log_likelihood(theta: np.ndarray) -> float:  # π = softmax(θ), θ_0 = 0
        pi = np.exp(np.concatenate([[0.0], theta]))
        pi /= pi.sum()
        return -np.log(p @ pi).sum()

    theta = optimize.minimize(negative_log_likelihood, np.zeros(4), method="BFGS", options={"gtol": 1e-9}).x
    reference = np.exp(np.concatenate([[0.0], theta]))
    reference /= reference.sum()
    np.testing.assert_allclose(prior.numpy(), reference, atol=1e-5)


def test_estimate_recovers_the_traffic_prior_and_the_test_decides():
    true = long_tail(8, 10.0)
    probabilities, labels = gaussian_traffic(true, 10000, seed=1)
    estimate = ls.estimate_prior(probabilities, tolerance=0.0)
    observed = torch.bincount(labels, minlength=8).double() / labels.numel()
    assert ls.l1_distance(estimate.prior, observed) < 0.05
    assert estimate.adapt and estimate.p_value < 1e-100
    low, high = ls.bootstrap_interval(probabilities[:4000], ls.estimate_prior(probabilities[:4000]), resamples=20)
    assert bool((low <= high).all()) and float((high - low).max()) < 0.1

    balanced, balanced_labels = gaussian_traffic(np.full(8, 1 / 8), 10000, seed=2)
    kept = ls.estimate_prior(balanced, tolerance=0.0)
    # Calibrated probabilities on balanced traffic: Λ is a χ²(7) draw, far below the 1e-3 quantile (24.3).
    assert not kept.adapt and kept.statistic < 24.3
    assert torch.equal(kept.applied, kept.reference)
    assert ls.l1_distance(kept.prior, torch.bincount(balanced_labels, minlength=8).double() / 10000) < 0.05


def test_likelihood_ratio_and_its_p_value_by_hand():
    rows = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], dtype=torch.float64)
    prior = torch.tensor([0.7, 0.3], dtype=torch.float64)
    by_hand = 2 * sum(math.log((a * 0.7 + b * 0.3) / 0.5) for a, b in rows.tolist())
    assert ls.likelihood_ratio(rows, prior, ls.uniform_prior(2)) == pytest.approx(by_hand)
    for x, dof in ((0.5, 1), (24.3, 7), (100.0, 9), (3.0, 999)):
        assert ls.chi2_survival(x, dof) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-9)
    # The tolerance is subtracted from Λ before the χ² tail: 2·N·τ = 2·3·0.1 = 0.6.
    estimate = ls.estimate_prior(rows, concentration=0.0, tolerance=0.1)
    assert estimate.p_value == pytest.approx(stats.chi2.sf(estimate.statistic - 0.6, 1))


def test_a_missing_class_or_a_zero_prior_never_gives_nan():
    probabilities, _ = gaussian_traffic(np.array([0.5, 0.5, 0.0]), 500, seed=3)
    estimate = ls.estimate_prior(probabilities)
    assert bool(torch.isfinite(estimate.prior).all()) and 0 < float(estimate.prior[2]) < 0.02
    z = torch.randn(4, 3)
    adjusted = ls.adjust_to_prior(z, torch.tensor([0.5, 0.5, 0.0]), None)
    assert bool(torch.isfinite(adjusted).all()) and bool((adjusted.argmax(1) != 2).all())
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 0, 1]), 3).double()
    assert bool(torch.isfinite(ls.estimate_prior(one_hot, concentration=0.0).prior.log()[:2]).all())


def test_adjusting_is_bayes_rule_on_calibrated_logits():
    z = torch.tensor([[1.0, 0.0, -1.0]])
    calibration = ls.ProbabilityCalibration(2.0, (0.1, 0.0, -0.1))
    prior = torch.tensor([0.2, 0.3, 0.5])
    got = torch.softmax(ls.adjust_to_prior(z, prior, calibration), dim=1)
    p_bal = torch.softmax(z.double() / 2 + torch.tensor([0.1, 0.0, -0.1], dtype=torch.float64), dim=1)
    expected = p_bal * prior.double() / (p_bal * prior.double()).sum()
    torch.testing.assert_close(got, expected)


# -- bias-corrected temperature scaling -------------------------------------------------------------
def test_bcts_recovers_a_known_temperature_and_bias():
    rng = np.random.default_rng(4)
    true_logits = torch.from_numpy(rng.normal(scale=2.0, size=(6000, 4)))
    true_bias = torch.tensor([0.5, 0.0, -0.3, -0.2], dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(true_logits + true_bias, dim=1), 1, generator=torch.Generator().manual_seed(0)).squeeze(1)
    observed = true_logits * 3.0  # an over-confident model: T = 3 undoes it
    temperature, bias = ls.fit_temperature_bias(observed, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    torch.testing.assert_close(bias - bias.mean(), true_bias - true_bias.mean(), atol=0.06, rtol=0)
    fitted = ls.fit_probability_calibration(observed[:2000], labels[:2000])
    assert fitted.bias_penalty <= 1e-2 and max(abs(b) for b in fitted.bias) > 0.2  # the bias is real: kept


def test_bcts_cross_validation_drops_biases_the_data_cannot_support():
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(scale=2.0, size=(600, 10)))  # 60 rows per class, no true bias
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=torch.Generator().manual_seed(1)).squeeze(1)
    fitted = ls.fit_probability_calibration(logits, labels)
    _, unpenalised = ls.fit_temperature_bias(logits, labels)
    assert fitted.bias_penalty > 0 and max(abs(b) for b in fitted.bias) < 0.5 * float(unpenalised.abs().max())
    with pytest.raises(InputError, match="at least 10 labelled rows"):
        ls.fit_probability_calibration(logits[:5], labels[:5])


def test_below_20_rows_per_class_only_the_temperature_is_fitted():
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(scale=2.0, size=(199, 10)))  # 19.9 rows per class
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=torch.Generator().manual_seed(1)).squeeze(1)
    assert ls.fit_probability_calibration(logits[:190].repeat(2, 1), labels[:190].repeat(2)).bias_penalty is not None  # 38 per class: CV
    fitted = ls.fit_probability_calibration(logits * 2.0, labels)
    assert fitted.bias_penalty is None and fitted.bias == (0.0,) * 10
    # the temperature minimises the NLL: its derivative in log T is zero there
    nll, grad_t, _ = ls.temperature_bias_nll(logits.float() * 2.0, labels, math.log(fitted.temperature), torch.zeros(10, dtype=torch.float64))
    assert 1.5 < fitted.temperature < 2.7 and abs(grad_t) < 1e-5
    raw = fitted.to_json()
    assert raw["bias_penalty"] is None and ls.ProbabilityCalibration.from_json(json.loads(json.dumps(raw))) == fitted
    check_label_shift_fields(raw, None, 10)  # null is a valid bias_penalty


def test_temperature_bias_nll_and_its_gradients_equal_autograd():
    rng = np.random.default_rng(6)
    z = torch.from_numpy(rng.normal(scale=3.0, size=(300, 7)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 7, size=300))
    bias = torch.from_numpy(rng.normal(scale=0.2, size=7))
    nll, grad_t, grad_bias = ls.temperature_bias_nll(z, y, 0.3, bias)
    log_t, b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True), bias.clone().requires_grad_(True)
    reference = torch.nn.functional.cross_entropy(z.double() * torch.exp(-log_t) + b, y)
    reference.backward()
    assert nll == pytest.approx(float(reference.detach()), abs=1e-6) and grad_t == pytest.approx(float(log_t.grad), abs=1e-6)
    torch.testing.assert_close(grad_bias, b.grad, atol=1e-6, rtol=0)
    assert ls.fit_temperature(z * 3, y) == pytest.approx(ls.fit_temperature_bias(z * 3, y, 1e9)[0], rel=1e-4)


# -- moving a served prior (issue 21 §1) --------------------------------------------------------------
@pytest.mark.parametrize(("counts", "shares", "kept"), [
    ({"a": 1000, "b": 100}, {"a": 0.5, "b": 0.5}, {"a": 100, "b": 100}),
    ({"a": 1000, "h": 3000}, {"a": 0.1, "h": 1.0}, {"a": 333, "h": 3000}),  # 333 / 3333 = 0.0999
    ({"a": 1000}, {"a": 0.99}, {"a": 0}),  # a share of nothing else: nothing
    ({"a": 1000}, {"a": 1.0}, {"a": 1000}),
    ({"a": 1000, "b": 1000, "c": 10}, {"a": 0.4, "b": 0.4, "c": 0.4}, {"a": 20, "b": 20, "c": 10}),
    ({}, {}, {}),
])
def test_capped_counts_hold_every_source_to_its_share(counts, shares, kept):
    assert ls.capped_counts(counts, shares) == kept
    total = sum(kept.values())
    assert all(kept[s] <= shares[s] * total + 1e-9 for s in kept)


def test_capped_counts_keep_the_most_rows_any_cap_allows():
    rng = np.random.default_rng(0)
    for _ in range(200):
        names = [f"s{i}" for i in range(rng.integers(1, 5))]
        counts = {n: int(rng.integers(0, 500)) for n in names}
        shares = {n: float(rng.choice([0.1, 0.25, 0.5, 1.0])) for n in names}
        kept = ls.capped_counts(counts, shares)
        total = sum(kept.values())
        assert all(kept[n] <= min(counts[n], shares[n] * total + 1e-9) for n in names)
        # no larger total holds every cap: checked against every total up to all the rows
        for larger in range(total + 1, sum(counts.values()) + 1):
            assert sum(min(counts[n], math.floor(shares[n] * larger + 1e-9)) for n in names) < larger


def test_step_toward_is_a_bounded_convex_step():
    current, target = ls.uniform_prior(4), torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    moved, cut = ls.step_toward(current, target, 0.2)
    assert cut and ls.l1_distance(current, moved) == pytest.approx(0.2)
    assert ls.l1_distance(moved, target) == pytest.approx(ls.l1_distance(current, target) - 0.2)  # on the segment
    assert float(moved.sum()) == pytest.approx(1.0) and ls.step_toward(current, target, 2.0) == (target, False)


def test_next_prior_checks_significance_bounds_the_step_and_weights_sources_by_share():
    balanced, _ = gaussian_traffic(np.full(4, 0.25), 4000, seed=1)
    skewed_prior = np.array([0.7, 0.1, 0.1, 0.1])
    skewed, _ = gaussian_traffic(skewed_prior, 4000, seed=2)
    # balanced traffic: nothing to publish
    stay = ls.next_prior({"gateway": balanced}, None, max_step=0.2)
    assert stay.prior is None and not stay.changed and not stay.adapt
    # shifted traffic: a step of at most 0.2 towards the estimate, then further steps, never past it
    first = ls.next_prior({"gateway": skewed}, None, max_step=0.2)
    assert first.changed and first.stepped and ls.l1_distance(first.prior, ls.uniform_prior(4)) == pytest.approx(0.2)
    current, steps = first.prior, 1
    while (update := ls.next_prior({"gateway": skewed}, current, max_step=0.2)).changed:
        assert ls.l1_distance(update.prior, current) <= 0.2 + 1e-9
        current, steps = update.prior, steps + 1
    assert steps >= 3 and ls.l1_distance(current, torch.from_numpy(skewed_prior)) < 0.05
    assert "not significantly better" in update.reason  # the estimate itself is not worth another version
    # two sources: each estimated on its own rows, averaged by share; the balanced one is kept balanced
    mixed = ls.next_prior({"honest": balanced, "skewed": skewed[:1000]}, None, max_step=2.0)
    w = 1000 / 5000
    expected = (1 - w) * ls.uniform_prior(4) + w * mixed.estimates["skewed"].prior
    torch.testing.assert_close(mixed.target, expected)
    assert not mixed.estimates["honest"].adapt and mixed.estimates["skewed"].adapt
    assert ls.l1_distance(mixed.prior, ls.uniform_prior(4)) <= 2 * w
    # back to balanced when the traffic is
    back = ls.next_prior({"gateway": balanced}, current, max_step=2.0)
    assert back.changed and back.prior is None and back.reason == "back to balanced"


# -- boundary checks --------------------------------------------------------------------------------
@pytest.mark.parametrize(("call", "match"), [
    (lambda: ls.estimate_prior(torch.tensor([[0.5, float("nan")]])), "finite and non-negative"),
    (lambda: ls.estimate_prior(torch.ones(3)), r"shape \(N, K\)"),
    (lambda: ls.estimate_prior(torch.full((2, 2), 0.5), concentration=-1), "concentration should be"),
    (lambda: ls.estimate_prior(torch.full((2, 2), 0.5), significance=0), "significance should be"),
    (lambda: ls.adjust_to_prior(torch.zeros(1, 3), torch.tensor([0.5, 0.5]), None), "3 values"),
    (lambda: ls.adjust_to_prior(torch.zeros(1, 2), torch.tensor([0.0, 0.0]), None), "positive sum"),
    # each finite, their sum not: once normalised to all zeros and reported as such
    (lambda: ls.check_prior([1e308] * 10, 10, "prior"), r"prior should hold finite numbers >= 0 with a positive, finite sum; found a sum of inf\."),
])
def test_bad_arguments_are_one_sentence(call, match):
    with pytest.raises(InputError, match=match):
        call()


@pytest.mark.parametrize(("field", "value", "match"), [
    ("probability_calibration", {"temperature": 0, "bias": [0.0] * 10}, r"temperature should be a number in \[0.0001, 10000\], found 0\."),
    # in range of a float, not of serving: z / T and z / T + b overflow float32, every answer with a prior a 422
    ("probability_calibration", {"temperature": 1e-300, "bias": [0.0] * 10}, r"temperature should be a number in \[0.0001, 10000\], found 1e-300\."),
    ("probability_calibration", {"temperature": 1e5, "bias": [0.0] * 10}, r"temperature should be a number in"),
    ("probability_calibration", {"temperature": 1.0, "bias": [1e300] * 10}, r"bias should be 10 finite numbers within ±1000, found \[1e\+300"),
    ("probability_calibration", {"temperature": 1.0, "bias": [0.0] * 3}, "bias should be 10 finite numbers"),
    ("probability_calibration", [1.0], "should be an object"),
    ("probability_calibration", {"temperature": 1.0, "bias": [0.0] * 10, "bias_penalty": "big"}, "bias_penalty should be"),
    ("target_prior", [0.1] * 9, "target_prior should be 10 finite numbers"),
    ("target_prior", [-0.1] + [0.1] * 9, "target_prior should be 10"),
    ("target_prior", [1e308] * 10, r"target_prior should be 10 finite numbers >= 0 with a positive, finite sum, found \[1e\+308"),
])
def test_artifact_fields_are_checked_on_read(field, value, match, tmp_path: Path, lt_banks):
    from disalign.calib.estimators.baselines.prior import Joint

    directory = Joint().fit(lt_banks["train"]).save(tmp_path / "calib")
    meta = json.loads((artifact_dir(directory) / "calibration.json").read_text())
    assert meta["probability_calibration"] is None and meta["target_prior"] is None  # written, null
    del meta["probability_calibration"], meta["target_prior"]  # an artifact written before these fields still loads
    (artifact_dir(directory) / "calibration.json").write_text(json.dumps(meta))
    assert load_calibration(directory).meta_.target_prior is None
    meta[field] = value
    (artifact_dir(directory) / "calibration.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=match):
        load_calibration(directory)


# -- real data --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_ir50_banks_forward_shift_is_closed_and_uniform_kept(tmp_path: Path):
    """The committed CIFAR-10-LT IR50 banks: the default DisAlign fit (ρ and the magnitude term chosen on val)
    with its BCTS on val; a forward-shifted test subset (imbalance 10) gains most of the oracle's accuracy, balanced traffic
    is left alone."""
    from disalign.calib.data.bank import load_bank
    from disalign.calib.estimators.disalign import DisAlign
    from disalign.cli.adapt import reference_probabilities

    calibrator = DisAlign().fit(EXAMPLES / "train.h5", val=EXAMPLES / "val.h5")
    fitted = ls.ProbabilityCalibration.from_json(calibrator.meta_.probability_calibration)
    assert 1.1 < fitted.temperature < 1.4  # DisAlign's logits are over-confident on val
    test = load_bank(EXAMPLES / "test.h5")
    labels = test.labels.numpy()
    rng = np.random.default_rng(0)
    heads = np.round(980 * 10 ** (-np.arange(10) / 9)).astype(int)
    rows = torch.from_numpy(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:heads[c]] for c in range(10)]))
    z = calibrator.predict_logits(test.features[rows], test.logits[rows])
    y = test.labels[rows]
    true = torch.from_numpy(heads / heads.sum())
    estimate = ls.estimate_prior(reference_probabilities(calibrator, test.features[rows], test.logits[rows]))
    assert estimate.adapt and ls.l1_distance(estimate.prior, true) < 0.15

    def accuracy(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == y).double().mean())

    balanced, oracle = accuracy(z), accuracy(ls.adjust_to_prior(z, true, fitted))
    adapted = accuracy(ls.adjust_to_prior(z, estimate.prior, fitted))
    assert oracle - balanced > 0.02 and (adapted - balanced) / (oracle - balanced) > 0.6

    uniform = ls.estimate_prior(reference_probabilities(calibrator, test.features, test.logits))  # all 9,800, balanced
    assert not uniform.adapt and 0.003 < uniform.statistic / uniform.num_samples < 2 * ls.DEFAULT_TOLERANCE
