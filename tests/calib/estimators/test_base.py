"""The estimator API as scikit-learn and numpy users expect it: get/set_params, clone, repr, fitted
attributes, check_is_fitted (with scikit-learn itself), numpy arrays in → numpy arrays out."""

from __future__ import annotations

import inspect

import h5py
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.utils.validation import check_is_fitted

from disalign.calib.errors import InputError, NotFittedError
from disalign.calib.estimators.baselines import LWS, NCM, LogitAdjustment
from disalign.calib.estimators.disalign import DEFAULT_RHO_GRID, DisAlign
from disalign.calib.estimators.methods import METHODS


@pytest.fixture(scope="module")
def fitted(lt_banks) -> DisAlign:
    return DisAlign(rho=1.0, epochs=1).fit(lt_banks["train"])


@pytest.fixture(scope="module")
def test_arrays(lt_banks) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(lt_banks["test"], "r") as f:  # what a user reading a bank with h5py holds: float16 / float32 arrays
        return f["features"][:50], f["logits"][:50]


@pytest.mark.parametrize("name", list(METHODS))
def test_get_params_are_the_init_keywords_and_clone_rebuilds_them(name):
    cls = METHODS[name]
    est = cls()
    parameters = inspect.signature(cls.__init__).parameters.values()  # Joint has none: object.__init__(*args, **kwargs)
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    assert list(est.get_params(deep=True)) == list(est.get_params(deep=False)) == names
    copy = clone(est)
    assert type(copy) is cls and copy is not est and copy.get_params() == est.get_params()


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_takes_the_same_fit_options(name):
    """max_memory and progress are fit() keywords of every estimator, so a caller never asks which one it holds."""
    cls = METHODS[name]
    options = [(p.name, p.kind, p.default) for p in inspect.signature(cls.fit).parameters.values() if p.name in ("max_memory", "progress")]
    assert options == [("max_memory", inspect.Parameter.KEYWORD_ONLY, None), ("progress", inspect.Parameter.KEYWORD_ONLY, False)]
    assert cls.streams_training_bank == (name == "disalign")  # the others load the bank whole


def test_a_method_that_cannot_stream_ignores_max_memory_and_prints_nothing(lt_banks, capsys):
    est = LWS(max_steps=5).fit(lt_banks["train"], max_memory=1, progress=True)  # its bar: only on a terminal
    assert est.meta_.report["steps_per_epoch"] == 1 and "streamed" not in est.meta_.report
    assert capsys.readouterr() == ("", "")


def test_clone_keeps_hyperparameters_exactly_as_given_and_drops_the_fit(fitted):
    est = DisAlign(rho=1.5, rho_grid=[0.0, 1.0], epochs=3, cosine=True)
    copy = clone(est)  # scikit-learn checks that __init__ stored each value as given
    assert copy.get_params() == est.get_params() and copy.rho_grid == [0.0, 1.0] and copy.rho_grid is not est.rho_grid
    refit = clone(fitted)
    assert refit.get_params() == fitted.get_params() and not hasattr(refit, "params_")
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(refit)


def test_set_params_sets_and_refuses_unknown_names():
    est = LogitAdjustment()
    assert est.set_params(tau=0.5, tau_grid=(0.5, 1.0)) is est and (est.tau, est.tau_grid) == (0.5, (0.5, 1.0))
    with pytest.raises(InputError, match=r"^rhoo is not a hyper-parameter of DisAlign; valid: rho, rho_grid, epochs, "):
        DisAlign().set_params(rhoo=1.0)
    with pytest.raises(InputError, match=r"^seed is not a hyper-parameter of NCM; valid: temperature\.$"):
        NCM().set_params(seed=1)


def test_repr_shows_the_non_default_hyperparameters():
    assert repr(DisAlign()) == "DisAlign()"
    assert repr(DisAlign(rho=1.5, epochs=3)) == "DisAlign(rho=1.5, epochs=3)"
    assert repr(DisAlign(rho_grid=DEFAULT_RHO_GRID, cosine=True)) == "DisAlign(cosine=True)"
    assert repr(LWS(epochs=5, seed=2)) == "LWS(seed=2)" and repr(NCM(temperature=2.0)) == "NCM(temperature=2.0)"


def test_fitted_attributes_and_check_is_fitted(fitted):
    est = DisAlign()
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(est)
    assert not hasattr(est, "classes_")  # NotFittedError is an AttributeError too
    with pytest.raises(NotFittedError, match="this DisAlign is not fitted yet; call fit"):
        est.classes_  # noqa: B018
    check_is_fitted(fitted)
    assert fitted.classes_.dtype == np.int64 and fitted.classes_.tolist() == list(range(10))
    assert fitted.class_names_ == [f"class_{i}" for i in range(10)] and fitted.n_features_in_ == 32


def test_numpy_in_numpy_out_and_tensors_in_tensors_out(fitted, test_arrays):
    features, logits = test_arrays
    assert features.dtype == np.float16 and logits.dtype == np.float32
    expected = fitted.predict_proba(torch.from_numpy(features), torch.from_numpy(logits))
    assert isinstance(expected, torch.Tensor)
    probabilities = fitted.predict_proba(features, logits)
    assert isinstance(probabilities, np.ndarray) and probabilities.dtype == np.float32 and probabilities.shape == (50, 10)
    assert np.array_equal(probabilities, expected.numpy())
    predictions = fitted.predict(features, logits)
    assert isinstance(predictions, np.ndarray) and predictions.dtype == np.int64
    assert np.array_equal(predictions, probabilities.argmax(1))
    calibrated = fitted.predict_logits(features, torch.from_numpy(logits))  # mixed: numpy, as one input is numpy
    assert isinstance(calibrated, np.ndarray)
    assert np.array_equal(calibrated, fitted.predict_logits(torch.from_numpy(features), torch.from_numpy(logits)).numpy())
    read_only = logits.copy()
    read_only.flags.writeable = False  # torch would warn (an error under pytest) if it wrapped this memory
    assert np.array_equal(fitted.predict(features, read_only), predictions)
    strided = np.asfortranarray(features)
    assert np.array_equal(fitted.predict(strided, logits), predictions)


def test_other_input_types_are_refused(fitted, test_arrays):
    features, logits = test_arrays
    with pytest.raises(InputError, match=r"^features should be a numpy array or a torch tensor, found list\.$"):
        fitted.predict(features.tolist(), logits)
    with pytest.raises(InputError, match=r"^logits should be a numeric array, found dtype <U1\.$"):
        fitted.predict(features, np.full((50, 10), "a"))
    with pytest.raises(InputError, match=r"logits should have shape \(N, 10\), found \(50, 9\)"):
        fitted.predict(features, logits[:, :9])


def test_rho_grid_is_checked_by_fit(lt_banks):
    with pytest.raises(InputError, match=r"^rho_grid should hold at least one value, found an empty grid\.$"):
        DisAlign(rho_grid=[], epochs=1).fit(lt_banks["train"], val=lt_banks["val"])
    with pytest.raises(InputError, match=r"^rho_grid should hold finite numbers >= 0, found 'x'\.$"):
        DisAlign(rho_grid=[1.0, "x"], epochs=1).fit(lt_banks["train"], val=lt_banks["val"])
