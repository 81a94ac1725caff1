"""disalign.calib.evaluation.evaluate: the report on hand cases and a synthetic bank, fit_baselines, format_table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from disalign.calib.data.bank import load_bank, write_bank
from disalign.calib.errors import ArtifactError, InputError
from disalign.calib.estimators.baselines import CRT, Joint, LogitAdjustment
from disalign.calib.evaluation.evaluate import (
    bootstrap_mean_class_accuracy,
    evaluate_methods,
    fit_baselines,
    format_table,
)

# K = 4; class 3 is absent from the test rows. Predictions 0 0 1 1 2 2 for labels 0 0 0 1 1 2 (as test_metrics).
HAND_PREDICTIONS = np.array([0, 0, 1, 1, 2, 2])
HAND_LABELS = np.array([0, 0, 0, 1, 1, 2])


@pytest.fixture
def hand_bank(tmp_path):
    logits = np.eye(4, dtype=np.float32)[HAND_PREDICTIONS] * 5.0
    # + one augmented view per image that predicts class 3, and one unlabelled clean row: neither is evaluated
    logits = np.concatenate([logits, np.tile(np.eye(4, dtype=np.float32)[3] * 5.0, (6, 1)), np.zeros((1, 4), np.float32)])
    labels = np.concatenate([HAND_LABELS, HAND_LABELS, [-1]])
    sample_index = np.concatenate([np.arange(6), np.arange(6), [6]])
    view = np.concatenate([np.zeros(6), np.ones(6), [0]]).astype(np.int16)
    return load_bank(write_bank(tmp_path / "hand.h5", np.zeros((13, 2), np.float32), logits, labels,
                                sample_index=sample_index, view=view, num_views=2))


def test_hand_case_report(hand_bank):
    report = evaluate_methods(hand_bank, {"joint": Joint().fit(hand_bank)}, class_counts=np.array([200, 50, 5, 1000]))
    m = report["methods"]["joint"]
    assert m["accuracy"] == pytest.approx(4 / 6) and m["mean_class_accuracy"] == pytest.approx(13 / 18)
    # many = classes 0 and 3 (3 is absent from the test rows), medium = class 1, few = class 2
    assert (m["many"], m["medium"], m["few"]) == pytest.approx((2 / 3, 1 / 2, 1.0))
    assert report["per_class_accuracy"]["joint"] == pytest.approx([2 / 3, 1 / 2, 1.0, None])
    assert report["class_counts"] == [200, 50, 5, 1000] and report["num_rows"] == 6
    rel = report["reliability"]["joint"]
    assert sum(rel["count"]) == 6 and len(rel["accuracy"]) == 15 and rel["accuracy"][0] is None
    assert rel["ece"] == m["ece"]
    json.dumps(report, allow_nan=False)  # plain JSON, no NaN


def test_group_without_classes_is_none_and_a_dash(hand_bank):
    report = evaluate_methods(hand_bank, {"joint": Joint().fit(hand_bank)}, class_counts=np.array([500, 400, 300, 200]))
    assert report["methods"]["joint"]["medium"] is None and report["methods"]["joint"]["few"] is None
    assert format_table(report).splitlines()[2].split()[4:6] == ["-", "-"]


def test_synthetic_bank_report_matches_the_estimators(long_tailed_banks):
    b = long_tailed_banks
    estimators = {"joint": Joint().fit(b.train), "logit-adjust": LogitAdjustment().fit(b.train, b.val)}
    report = evaluate_methods(b.test, estimators, class_counts=b.counts)
    assert list(report["methods"]) == ["joint", "logit-adjust"]
    for name, est in estimators.items():
        m = report["methods"][name]
        assert all(0.0 <= m[key] <= 1.0 for key in ("accuracy", "mean_class_accuracy", "many", "medium", "few", "ece"))
        predictions = est.predict(b.test.features, b.test.logits)
        assert m["accuracy"] == pytest.approx(float((predictions == b.test.labels).double().mean()))
        per_class = report["per_class_accuracy"][name]
        assert len(per_class) == 7 and m["few"] == pytest.approx(np.mean(per_class[5:]))  # counts 12 and 6 are few
    assert report["methods"]["logit-adjust"]["mean_class_accuracy"] > report["methods"]["joint"]["mean_class_accuracy"]


def test_bad_inputs_are_named(long_tailed_banks, hand_bank):
    b = long_tailed_banks
    joint = Joint().fit(b.train)
    with pytest.raises(InputError, match=r"class_counts should have shape \(7,\) like the test bank's logits, found \(3,\)\."):
        evaluate_methods(b.test, {"joint": joint}, class_counts=np.array([1, 2, 3]))
    with pytest.raises(ArtifactError, match=r"the calibration has K=7 classes but the test bank .*hand\.h5 has K=4\."):
        evaluate_methods(hand_bank, {"joint": joint}, class_counts=np.ones(4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_counts": np.array([5, -1, 3, 2, 1, 1, 1])}, r"class_counts should hold non-negative numbers"),
        ({"few_below": 200}, r"few_below should be at most many_above \+ 1, found few_below=200 and many_above=100\."),
        ({"num_bins": 0}, r"num_bins should be >= 1, found 0\."),
    ],
)
def test_bad_settings_are_named(long_tailed_banks, kwargs, message):
    b = long_tailed_banks
    with pytest.raises(InputError, match=message):
        evaluate_methods(b.test, {}, **{"class_counts": b.counts, **kwargs})


def test_unlabelled_test_bank(tmp_path):
    bank = load_bank(write_bank(tmp_path / "u.h5", np.zeros((2, 1), np.float32), np.zeros((2, 2), np.float32), [-1, -1]))
    with pytest.raises(InputError, match=r"test bank .*u\.h5 has no labelled rows in its clean view \(view 0\)\."):
        evaluate_methods(bank, {}, class_counts=np.ones(2))


def test_fit_baselines_by_name(long_tailed_banks):
    b = long_tailed_banks
    fitted = fit_baselines(["joint", "crt", "joint"], b.train, b.val, seed=3)
    assert list(fitted) == ["joint", "crt"]
    assert isinstance(fitted["crt"], CRT) and fitted["crt"].seed == 3 and hasattr(fitted["crt"], "params_")
    with pytest.raises(InputError, match=r"baseline should be one of joint, logit-adjust, tau-norm, lws, crt, ncm, tde, found 'disalign'\."):
        fit_baselines(["joint", "disalign"], b.train, None)


def test_format_table_is_aligned_with_percentages_and_dashes():
    report = {"methods": {
        "joint": {"accuracy": 0.5, "mean_class_accuracy": 0.41234, "many": 0.9, "medium": None, "few": 0.0, "ece": 0.1234, "nll": 1.23456},
        "logit-adjust": {"accuracy": 1.0, "mean_class_accuracy": 0.5, "many": 0.75, "medium": 0.5, "few": 0.25, "ece": 0.05, "nll": 0.5},
    }}
    assert format_table(report) == (
        "method          acc  mean-cls  many  medium   few   ECE    NLL\n"
        "------------  -----  --------  ----  ------  ----  ----  -----\n"
        "joint          50.0      41.2  90.0       -   0.0  12.3  1.235\n"
        "logit-adjust  100.0      50.0  75.0    50.0  25.0   5.0  0.500"
    )


def test_predictions_in_blocks_give_the_same_report(long_tailed_banks, monkeypatch):
    import disalign.calib.evaluation.evaluate

    b = long_tailed_banks
    estimators = {"logit-adjust": LogitAdjustment().fit(b.train)}
    whole = evaluate_methods(b.test, estimators, class_counts=b.counts)
    monkeypatch.setattr(disalign.calib.evaluation.evaluate, "PREDICT_BLOCK_ROWS", 64)  # 700 rows → 11 blocks
    assert evaluate_methods(b.test, estimators, class_counts=b.counts) == whole


# -- bootstrap intervals and the method best on validation ---------------------------------------
def synthetic_correct(rows_per_class: int, accuracies=(0.9, 0.6, 0.3), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (3·rows_per_class,) and correct (2, N): method 0 right with the given per-class rates, method 1 = method 0."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(rows_per_class)
    right = torch.rand(labels.numel(), generator=generator) < torch.tensor(accuracies)[labels]
    return torch.stack([right, right]), labels


def test_bootstrap_spread_is_the_binomial_one_and_shrinks_with_n():
    spreads = []
    for n in (100, 1600):
        correct, labels = synthetic_correct(n)
        samples = bootstrap_mean_class_accuracy(correct, labels, resamples=2000)
        assert samples.shape == (2, 2000) and torch.equal(samples[0], samples[1])  # paired: the same resamples
        p = torch.stack([correct[0][labels == c].double().mean() for c in range(3)])
        point = float(p.mean())
        low, high = torch.quantile(samples[0], torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        assert low < point < high
        # stratified resampling: per-class accuracy ~ Binomial(n, p_c) / n, so sd = sqrt(Σ p_c(1 − p_c)/n) / 3
        expected_sd = float((p * (1 - p) / n).sum().sqrt() / 3)
        assert float(samples[0].std()) == pytest.approx(expected_sd, rel=0.1)
        spreads.append(high - low)
    assert spreads[1] < spreads[0] / 3  # 16× the rows: about a quarter of the width


def test_bootstrap_draws_rows_directly_or_by_pattern_alike():
    # 3 classes of 40 rows: 2 patterns per class take the multinomial path, 8 random methods the direct one
    few, labels = synthetic_correct(40)
    many = torch.rand(8, 120, generator=torch.Generator().manual_seed(1)) < 0.5
    for correct in (few, many):
        samples = bootstrap_mean_class_accuracy(correct, labels, resamples=4000)
        point = torch.stack([correct[:, labels == c].double().mean(1) for c in range(3)]).mean(0)
        assert torch.allclose(samples.mean(1), point, atol=0.005)  # unbiased


def test_eval_report_has_intervals_and_names_the_method_best_on_val(long_tailed_banks):
    b = long_tailed_banks
    estimators = {"joint": Joint().fit(b.train), "logit-adjust": LogitAdjustment().fit(b.train, b.val)}
    report = evaluate_methods(b.test, estimators, class_counts=b.counts, val=b.val)
    val = report["validation"]
    assert val["num_rows"] == 210 and val["best"] == "logit-adjust"
    assert val["mean_class_accuracy"]["logit-adjust"] == estimators["logit-adjust"].meta_.report["validation"]["val_mean_class_accuracy"]
    boot = report["bootstrap"]
    assert boot["resamples"] == 1000 and boot["level"] == 0.95
    for name, (low, high) in boot["mean_class_accuracy"].items():
        assert low <= report["methods"][name]["mean_class_accuracy"] <= high
    assert boot["difference_to_best"]["logit-adjust"] == [0.0, 0.0]
    low, high = boot["difference_to_best"]["joint"]
    assert low < high < 0  # the stage-1 model is clearly worse on this bank
    table = format_table(report).splitlines()
    assert table[0].split()[-7:] == ["mean-cls", "95%", "CI", "vs", "logit-adjust", "95%", "CI"]
    assert table[-1].startswith("best on the validation bank: logit-adjust (val mean-cls ")
    lowest = min(val["nll"], key=val["nll"].get)
    assert val["lowest_nll"] == lowest
    assert table[-1].endswith(" on 210 rows)" if lowest == "logit-adjust" else
                              f" on 210 rows); lowest val NLL: {lowest} ({val['nll'][lowest]:.3f} against {val['nll']['logit-adjust']:.3f})")
    json.dumps(report, allow_nan=False)
    plain = evaluate_methods(b.test, estimators, class_counts=b.counts, bootstrap_resamples=0)
    assert "bootstrap" not in plain and "validation" not in plain


def test_a_methods_interval_does_not_depend_on_the_other_methods(long_tailed_banks):
    """Issue 21 §5: the interval of one method changed with which other methods were evaluated (one draw for all)."""
    b = long_tailed_banks
    joint, adjusted, crt = Joint().fit(b.train), LogitAdjustment().fit(b.train, b.val), CRT(max_steps=2).fit(b.train)

    def intervals(estimators):
        return evaluate_methods(b.test, estimators, class_counts=b.counts, val=b.val)["bootstrap"]

    alone = intervals({"logit-adjust": adjusted})["mean_class_accuracy"]["logit-adjust"]
    pair = intervals({"joint": joint, "logit-adjust": adjusted})
    three = intervals({"crt": crt, "logit-adjust": adjusted, "joint": joint})
    assert pair["mean_class_accuracy"]["logit-adjust"] == alone == three["mean_class_accuracy"]["logit-adjust"]
    assert pair["mean_class_accuracy"]["joint"] == three["mean_class_accuracy"]["joint"]
    # the paired difference of joint against the best depends on those two only
    assert pair["difference_to_best"]["joint"] == three["difference_to_best"]["joint"]
    assert pair["seed"] == 0 and "per method" in pair["seeds"]


def test_the_table_never_prints_negative_zero():
    report = {"methods": {"joint": {"accuracy": -1e-9, "mean_class_accuracy": 0.5, "many": -0.0, "medium": None, "few": 0.0,
                                    "ece": -0.0, "nll": -0.0}},
              "bootstrap": {"level": 0.95, "mean_class_accuracy": {"joint": [0.49, 0.51]}, "difference_to_best": {"joint": [-0.0001, 0.0]}},
              "validation": {"best": "joint", "num_rows": 10, "mean_class_accuracy": {"joint": 0.5}, "nll": {"joint": 0.1},
                             "lowest_nll": "joint"}}
    table = format_table(report)
    assert "-0.0" not in table and "[0.0, 0.0]" in table, table


def test_table_names_the_lowest_validation_nll_when_it_is_not_the_most_accurate():
    methods = {name: {"accuracy": 0.76, "mean_class_accuracy": 0.76, "many": None, "medium": None, "few": None, "ece": 0.05, "nll": 0.7}
               for name in ("disalign", "logit-adjust")}
    validation = {"num_rows": 200, "mean_class_accuracy": {"disalign": 0.80, "logit-adjust": 0.805},
                  "nll": {"disalign": 0.616, "logit-adjust": 0.629}, "best": "logit-adjust", "lowest_nll": "disalign"}
    last = format_table({"methods": methods, "validation": validation}).splitlines()[-1]
    assert last == ("best on the validation bank: logit-adjust (val mean-cls 80.5 on 200 rows); "
                    "lowest val NLL: disalign (0.616 against 0.629)")
    validation.update(lowest_nll="logit-adjust")
    assert format_table({"methods": methods, "validation": validation}).splitlines()[-1].endswith("on 200 rows)")


def test_a_fit_that_trained_on_the_validation_rows_is_scored_on_them_out_of_fold():
    """Memorised training bank: DisAlign's default mixes the validation rows into its fit, so eval takes its
    validation scores from the fit's out-of-fold predictions; in-sample it would be scored on rows it learned."""
    from disalign.calib.core.metrics import mean_class_accuracy
    from disalign.calib.data.bank import Bank
    from disalign.calib.estimators.disalign import DisAlign
    from tests.calib.estimators.test_disalign import memorised_arrays

    generator = torch.Generator().manual_seed(0)
    train = Bank.from_arrays(*memorised_arrays(generator, [400, 200, 100, 50], None, biased=False), model_fingerprint="sha256:m")
    val = Bank.from_arrays(*memorised_arrays(generator, [50, 50, 50, 50], None, biased=True), model_fingerprint="sha256:m", role="val")
    test = Bank.from_arrays(*memorised_arrays(generator, [100, 100, 100, 100], None, biased=True), model_fingerprint="sha256:m", role="test")
    disalign = DisAlign(rho_grid=(0.0, 1.0), epochs=2, val_folds=2).fit(train, val)
    assert disalign.meta_.report["validation_rows_in_fit"]["rows"] == 200
    estimators = {"disalign": disalign, "logit-adjust": LogitAdjustment().fit(train, val)}
    report = evaluate_methods(test, estimators, class_counts=train.training_class_counts(), val=val, train=train, bootstrap_resamples=0)
    scores, fitted = report["validation"], disalign.meta_.report["validation"]
    assert scores["out_of_fold"] == ["disalign"] and fitted["cross_fitted"]
    assert scores["mean_class_accuracy"]["disalign"] == fitted["val_mean_class_accuracy"]
    assert scores["nll"]["disalign"] == fitted["val_nll"]
    in_sample = disalign.predict_logits(val.features, val.logits)
    assert float(torch.nn.functional.cross_entropy(in_sample, val.labels)) < fitted["val_nll"]  # what scoring in-sample would flatter
    assert mean_class_accuracy(estimators["logit-adjust"].predict_logits(val.features, val.logits).argmax(1), val.labels, 4) == \
        scores["mean_class_accuracy"]["logit-adjust"]
    assert report["regime"]["name"] == "memorised" and report["regime"]["sentence"].startswith("regime: memorised — ")
    assert report["recommendation"].startswith(f"recommendation: {scores['lowest_nll']} (lowest validation NLL: ")
    assert (f"or {scores['best']} (best validation mean-class accuracy" in report["recommendation"]) == (scores["best"] != scores["lowest_nll"])
    assert report["recommendation"].endswith("the training bank is memorised, so only methods that need no training rows or that "
                                             "trained on held-out ones (DisAlign's default, --val-weight regime) see the bias.")
    table = format_table(report)
    assert "disalign scored out of fold (trained on these rows)" in table
    assert table.splitlines()[-2:] == [report["regime"]["sentence"], report["recommendation"]]
    # Another validation bank (other rows): scored on it as usual.
    other = Bank.from_arrays(*memorised_arrays(generator, [30, 30, 30, 30], None, biased=True), model_fingerprint="sha256:m", role="val")
    assert evaluate_methods(test, estimators, class_counts=train.training_class_counts(), val=other,
                            bootstrap_resamples=0)["validation"]["out_of_fold"] == []


def test_the_recommendation_names_the_lowest_nll_and_a_more_accurate_method_when_they_differ():
    from disalign.calib.core.regime import Regime
    from disalign.calib.evaluation.evaluate import recommendation

    # The IR10 cosine model of the suite: DisAlign has the lowest validation NLL, cRT one more right row of 200.
    validation = {"num_rows": 200, "lowest_nll": "disalign", "best": "crt", "nll": {"disalign": 0.927, "crt": 1.003},
                  "mean_class_accuracy": {"disalign": 0.690, "crt": 0.695}}
    assert recommendation(Regime(0.631, 0.61, 0.95), validation) == (
        "recommendation: disalign (lowest validation NLL: 0.927 on 200 rows), or crt (best validation mean-class accuracy: "
        "69.5 % against 69.0 %); the training bank shows the bias, so a method fitted on it can be trusted here.")
    agreeing = {**validation, "best": "disalign"}
    assert recommendation(Regime(0.99, 0.7, 0.03), agreeing) == (
        "recommendation: disalign (lowest validation NLL: 0.927 on 200 rows); the training bank is memorised, so only methods "
        "that need no training rows or that trained on held-out ones (DisAlign's default, --val-weight regime) see the bias.")
