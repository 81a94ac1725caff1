"""The array API: fit(features, logits, labels, class_counts=None) equals the bank fit, logits-only methods take
features=None, score is the mean-class accuracy, and scikit-learn's own clone / check_is_fitted / Pipeline /
GridSearchCV work through the documented SklearnAdapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.validation import check_is_fitted

import disalign
from disalign.calib.core.metrics import mean_class_accuracy
from disalign.calib.data.bank import Bank
from disalign.calib.errors import ArtifactError, InputError
from disalign.calib.estimators.baselines import LWS, TDE, Joint, LogitAdjustment, TauNorm
from disalign.calib.estimators.disalign import DisAlign
from disalign.calib.estimators.methods import METHODS
from disalign.calib.estimators.sklearn_adapter import SklearnAdapter, split_inputs, stack_inputs


def arrays(bank: Bank) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return bank.features.numpy(), bank.logits.numpy(), bank.labels.numpy()


@pytest.mark.parametrize("name", list(METHODS))
def test_array_fit_equals_the_bank_fit_for_every_method(name, long_tailed_banks):
    b = long_tailed_banks
    features, logits, labels = arrays(b.train)
    kwargs = {"epochs": 1} if name in ("disalign", "lws", "crt") else {}
    kwargs |= {"rho": 1.0} if name == "disalign" else {}
    kwargs |= {"max_steps": 20} if name in ("lws", "crt") else {}
    from_bank = METHODS[name](**kwargs).fit(b.train)
    from_arrays = METHODS[name](**kwargs).fit(features, logits, labels, b.counts, classifier=(b.weight, b.bias))
    test_features, test_logits, _ = arrays(b.test)
    expected = from_bank.predict_proba(test_features, test_logits)
    assert np.allclose(from_arrays.predict_proba(test_features, test_logits), expected, atol=1e-6)


def test_class_counts_default_to_the_label_histogram(long_tailed_banks):
    features, logits, labels = arrays(long_tailed_banks.train)
    est = DisAlign(rho=1.0, epochs=1).fit(features, logits, labels)
    assert est.meta_.class_counts == np.bincount(labels, minlength=7).tolist() == long_tailed_banks.counts.tolist()
    torch_fit = DisAlign(rho=1.0, epochs=1).fit(torch.from_numpy(features), torch.from_numpy(logits), torch.from_numpy(labels))
    assert torch.equal(torch_fit.params_["alpha"], est.params_["alpha"])


def test_val_as_arrays_chooses_like_a_val_bank(long_tailed_banks):
    b = long_tailed_banks
    on_bank = LogitAdjustment(tau="auto").fit(b.train, b.val)
    on_arrays = LogitAdjustment(tau="auto").fit(*arrays(b.train), val=arrays(b.val))
    assert on_arrays.meta_.report["tau"] == on_bank.meta_.report["tau"]
    mine, theirs = on_arrays.meta_.probability_calibration, on_bank.meta_.probability_calibration
    assert mine["temperature"] == pytest.approx(theirs["temperature"]) and mine["bias"] == pytest.approx(theirs["bias"])


def test_logits_only_methods_take_features_none(long_tailed_banks):
    b = long_tailed_banks
    _, logits, labels = arrays(b.train)
    _, test_logits, _ = arrays(b.test)
    for est in (Joint().fit(None, logits, labels), LogitAdjustment(tau=1.0).fit(None, logits, labels),
                LWS(epochs=1, max_steps=10).fit(None, logits, labels)):
        with_bank = type(est)(**est.get_params()).fit(b.train)
        assert np.allclose(est.predict_proba(None, test_logits), with_bank.predict_proba(b.test.features, test_logits), atol=1e-6)
        assert est.predict(None, test_logits).shape == (700,)
    # tau-norm from the logits alone: (z - b) / ‖W‖^τ, equal to x · W̃ᵀ up to the float16 features of the bank
    from_features = TauNorm(tau=1.0).fit(b.train)
    from_logits = TauNorm(tau=1.0).fit(None, logits, labels, classifier=(b.weight, b.bias))
    reference = from_features.predict_logits(b.test.features, b.test.logits)
    assert torch.allclose(from_features.predict_logits(None, b.test.logits), reference, atol=1e-3)
    assert np.allclose(from_logits.predict_logits(None, test_logits), reference.numpy(), atol=1e-3)


def test_methods_that_need_features_say_so(long_tailed_banks):
    _, logits, labels = arrays(long_tailed_banks.train)
    for cls in (DisAlign, TDE):
        with pytest.raises(InputError, match=rf"^{cls.method} needs the features \(N, d\) of the training rows; only joint, "
                                             r"logit-adjust, lws and tau-norm \(with classifier=\(weight, bias\)\) calibrate logits alone\.$"):
            cls().fit(None, logits, labels)
    with pytest.raises(InputError, match=r"^tau-norm needs the features"):  # without the classifier there is no W
        TauNorm().fit(None, logits, labels)
    fitted = DisAlign(rho=1.0, epochs=1).fit(long_tailed_banks.train)
    with pytest.raises(InputError, match=r"^this DisAlign calibration needs the features \(N, 16\) beside the logits"):
        fitted.predict_proba(None, logits)
    with pytest.raises(ArtifactError, match=r"fitted without features \(features=None\).*fit it with the features to save it"):
        Joint().fit(None, logits, labels).save(long_tailed_banks.paths["train"].parent / "nowhere")


def test_array_input_errors_name_the_shapes(long_tailed_banks):
    features, logits, labels = arrays(long_tailed_banks.train)
    with pytest.raises(InputError, match=r"train labels should be a 1d array of 793 integer labels, got an array of shape \(793, 1\)"):
        Joint().fit(features, logits, labels[:, None])
    with pytest.raises(InputError, match=r"train features should be a 2d array \(793, d\) like the logits, got an array of shape \(10, 16\)"):
        Joint().fit(features[:10], logits, labels)
    with pytest.raises(InputError, match=r"train labels should be in 0\.\.6 \(or -1 for unlabelled\), found 0\.\.7"):
        Joint().fit(features, logits, np.where(labels == 6, 7, labels))
    with pytest.raises(InputError, match=r"class_counts should be 7 training counts >= 0 \(one per logit column\), got an array of shape \(3,\)"):
        Joint().fit(features, logits, labels, [1, 2, 3])
    with pytest.raises(InputError, match=r"fit takes a bank or \(features, logits, labels\) arrays, found ndarray and no labels"):
        Joint().fit(features, logits)
    with pytest.raises(InputError, match=r"the classifier weight should have shape \(7, 16\) \(K, d\), got \(16, 7\)"):
        TauNorm().fit(features, logits, labels, classifier=(long_tailed_banks.weight.T, None))


def test_score_is_the_mean_class_accuracy(long_tailed_banks):
    b = long_tailed_banks
    est = LogitAdjustment(tau=1.0).fit(b.train)
    features, logits, labels = arrays(b.test)
    expected = mean_class_accuracy(torch.from_numpy(est.predict(features, logits)), b.test.labels, 7)
    assert est.score(features, logits, labels) == expected
    unlabelled = labels.copy()
    unlabelled[:100] = -1  # class 0's rows: left out, and the mean is over the classes present
    kept = slice(100, None)
    assert est.score(features, logits, unlabelled) == mean_class_accuracy(
        torch.from_numpy(est.predict(features[kept], logits[kept])), b.test.labels[kept], 7)


# -- scikit-learn: the estimators, and the adapter in a Pipeline and a GridSearchCV -----------------------------
def test_clone_and_check_is_fitted_with_the_array_fit(long_tailed_banks):
    features, logits, labels = arrays(long_tailed_banks.train)
    est = DisAlign(rho=1.5, epochs=1)
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(est)
    est.fit(features, logits, labels)
    check_is_fitted(est)
    fresh = clone(est)
    assert fresh.get_params() == est.get_params() and not hasattr(fresh, "params_")
    adapter = SklearnAdapter(DisAlign(rho=1.5, epochs=1), num_classes=7)
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(adapter)
    adapter.fit(stack_inputs(features, logits), labels)
    check_is_fitted(adapter)
    assert not hasattr(adapter.calibrator, "params_")  # the hyper-parameter object is never fitted: a clone is
    assert clone(adapter).get_params()["calibrator__rho"] == 1.5


def test_stack_and_split_inputs(long_tailed_banks):
    features, logits, _ = arrays(long_tailed_banks.test)
    X = stack_inputs(features, logits)
    assert X.shape == (700, 23) and X.dtype == np.float32
    f, z = split_inputs(X, 7)
    assert np.array_equal(f, features.astype(np.float32)) and np.array_equal(z, logits)
    assert split_inputs(stack_inputs(None, logits), 7)[0] is None
    with pytest.raises(InputError, match=r"X should be a 2d array \[features \| logits\] with at least num_classes=30 columns"):
        split_inputs(X, 30)
    with pytest.raises(InputError, match=r"num_classes should be K >= 1, the width of the logits in the last columns of X, found None"):
        SklearnAdapter(Joint()).fit(X, np.zeros(700, dtype=int))


def test_pipeline_gives_the_calibrators_own_answers(long_tailed_banks):
    b = long_tailed_banks
    X_train, y_train = stack_inputs(b.train.features.numpy(), b.train.logits.numpy()), b.train.labels.numpy()
    X_test, y_test = stack_inputs(b.test.features.numpy(), b.test.logits.numpy()), b.test.labels.numpy()
    pipeline = Pipeline([("float32", FunctionTransformer(lambda X: np.asarray(X, dtype=np.float32))),
                         ("calibrate", SklearnAdapter(DisAlign(rho=1.0, epochs=2), num_classes=7))]).fit(X_train, y_train)
    direct = DisAlign(rho=1.0, epochs=2).fit(*arrays(b.train))
    test_features, test_logits, _ = arrays(b.test)
    assert np.allclose(pipeline.predict_proba(X_test), direct.predict_proba(test_features, test_logits), atol=1e-6)
    assert np.array_equal(pipeline.predict(X_test), direct.predict(test_features, test_logits))
    assert pipeline.score(X_test, y_test) == direct.score(test_features, test_logits, y_test)
    assert pipeline.named_steps["calibrate"].decision_function(X_test).shape == (700, 7)


def test_grid_search_over_rho(long_tailed_banks):
    b = long_tailed_banks
    X, y = stack_inputs(b.train.features.numpy(), b.train.logits.numpy()), b.train.labels.numpy()
    grid = {"calibrator__rho": [0.0, 1.0, 2.0]}
    search = GridSearchCV(SklearnAdapter(DisAlign(epochs=1), num_classes=7), grid, cv=StratifiedKFold(3, shuffle=True, random_state=0))
    search.fit(X, y)
    # the search's own numbers, recomputed by hand: mean over the folds of the held-out mean-class accuracy
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    for rho, mean_score in zip(grid["calibrator__rho"], search.cv_results_["mean_test_score"], strict=True):
        scores = []
        for train_rows, test_rows in folds:
            est = DisAlign(rho=rho, epochs=1).fit(*split_inputs(X[train_rows], 7), y[train_rows])
            scores.append(est.score(*split_inputs(X[test_rows], 7), y[test_rows]))
        assert mean_score == pytest.approx(np.mean(scores), abs=1e-12)
    best = search.best_estimator_.calibrator_
    assert search.best_params_["calibrator__rho"] == best.rho and best.meta_.num_classes == 7
    assert best.meta_.class_counts == long_tailed_banks.counts.tolist()  # refitted on all the rows


def test_namespace_exports_the_adapter():
    assert disalign.SklearnAdapter is SklearnAdapter and disalign.stack_inputs is stack_inputs and disalign.TDE is TDE
