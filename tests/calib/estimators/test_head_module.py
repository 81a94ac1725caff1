"""CalibrationHead: the fitted calibration as an nn.Module equals predict_proba / predict_logits, for every method."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from disalign.calib.data.bank import load_bank, write_bank
from disalign.calib.errors import InputError, NotFittedError
from disalign.calib.estimators.baselines import Joint
from disalign.calib.estimators.head_module import EXPORTABLE_METHODS, CalibrationHead
from disalign.calib.estimators.methods import METHODS

QUICK = {"disalign": {"epochs": 2}, "lws": {"epochs": 1, "max_steps": 20}, "crt": {"epochs": 1, "max_steps": 20}}


def fitted(name: str, banks) -> object:
    return METHODS[name](**QUICK.get(name, {})).fit(banks.train, banks.val)


def assert_head_matches(est, features: torch.Tensor, logits: torch.Tensor) -> None:
    head = CalibrationHead(est).eval()
    with torch.inference_mode():
        probabilities, calibrated = head(features, logits)
    torch.testing.assert_close(calibrated, est.predict_logits(features, logits), rtol=0, atol=0)
    torch.testing.assert_close(probabilities, est.predict_proba(features, logits), rtol=0, atol=0)


def test_every_method_is_exportable():
    assert set(EXPORTABLE_METHODS) == set(METHODS)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_head_is_the_estimator(name, long_tailed_banks):
    est = fitted(name, long_tailed_banks)
    test = long_tailed_banks.test
    assert_head_matches(est, test.features.float(), test.logits)
    head = CalibrationHead(est)
    assert set(dict(head.named_buffers())) == set(est.params_)  # the fitted tensors, as buffers (state_dict, .to())
    assert repr(head).startswith(f"CalibrationHead(method='{name}'")


@pytest.mark.parametrize("name", ["disalign", "ncm", "tde", "logit-adjust"])
def test_a_background_column_is_kept(name, long_tailed_banks, tmp_path):
    """RoI banks: the background logit stays the stage-1 one, in the module as in the estimator."""
    banks = {}
    for split in ("train", "val"):
        bank = getattr(long_tailed_banks, split)
        labels = bank.labels.numpy()  # class 0's rows are the background rows
        counts = np.bincount(labels, minlength=7)
        counts[0] = 0  # by convention
        banks[split] = load_bank(write_bank(tmp_path / f"{split}.h5", bank.features.numpy(), bank.logits.numpy(), labels,
                                            class_counts=counts, background_index=0, model_fingerprint="sha256:bg",
                                            classifier_weight=long_tailed_banks.weight, classifier_bias=long_tailed_banks.bias))
    est = METHODS[name](**QUICK.get(name, {})).fit(banks["train"], banks["val"])
    features, logits = long_tailed_banks.test.features.float(), long_tailed_banks.test.logits
    assert_head_matches(est, features, logits)
    _, calibrated = CalibrationHead(est)(features, logits)
    torch.testing.assert_close(calibrated[:, 0], logits[:, 0], rtol=0, atol=0)


def test_a_target_prior_is_applied_as_predict_does(long_tailed_banks):
    est = fitted("disalign", long_tailed_banks)
    assert est.meta_.probability_calibration is not None
    prior = [0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    est.meta_ = dataclasses.replace(est.meta_, target_prior=prior)  # what `disalign adapt --out` writes
    test = long_tailed_banks.test
    head = CalibrationHead(est)
    assert head.prior_shift.dtype == torch.float64
    features, logits = test.features.float(), test.logits
    _, calibrated = head(features, logits)
    torch.testing.assert_close(calibrated, est.predict_logits(features, logits), rtol=0, atol=1e-6)
    probabilities, _ = head(features, logits)
    torch.testing.assert_close(probabilities, est.predict_proba(features, logits), rtol=0, atol=1e-7)


def test_refusals(long_tailed_banks):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        CalibrationHead(METHODS["disalign"]())

    class Custom(Joint):
        method = "custom"

    est = Custom().fit(long_tailed_banks.train)
    with pytest.raises(InputError, match=r"method 'custom' cannot be exported: .* \(exportable: joint, disalign, .*tde\)\.$"):
        CalibrationHead(est)
