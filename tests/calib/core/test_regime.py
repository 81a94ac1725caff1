import pytest
import torch

from disalign.calib.core.regime import MEMORISED_BELOW, Regime, training_regime


def test_visible_share_is_the_ratio_of_mean_class_errors_hand_computed():
    # Training: class 0 has 8 rows, all right; class 1 has 2 rows, one right → mean-class accuracy (1 + 0.5) / 2 = 0.75.
    train_labels = torch.tensor([0] * 8 + [1] * 2)
    train_predicted = torch.tensor([0] * 8 + [1, 0])
    # Validation: 2 rows per class; class 0 both right, class 1 none right → 0.5.
    val_labels = torch.tensor([0, 0, 1, 1])
    val_predicted = torch.tensor([0, 0, 0, 0])
    regime = training_regime(train_predicted, train_labels, val_predicted, val_labels, 2)
    assert regime.train_mean_class_accuracy == 0.75 and regime.val_mean_class_accuracy == 0.5
    assert regime.visible_share == pytest.approx(0.25 / 0.5)
    assert not regime.memorised and regime.name == "bias-visible"


def test_a_training_bank_without_errors_is_memorised_and_an_errorless_validation_bank_hides_nothing():
    labels = torch.tensor([0, 1, 1, 2])
    memorised = training_regime(labels, labels, torch.tensor([0, 0, 0, 2]), labels, 3)
    assert memorised.visible_share == 0.0 and memorised.memorised
    assert training_regime(torch.tensor([0, 0, 0, 0]), labels, labels, labels, 3).visible_share == 1.0


def test_the_threshold_and_the_sentences_are_pinned():
    assert not Regime(0.8, 0.7, MEMORISED_BELOW).memorised and Regime(0.8, 0.7, MEMORISED_BELOW - 1e-9).memorised
    memorised = Regime(0.99, 0.65, 0.01 / 0.35)
    assert memorised.sentence() == (
        "regime: memorised — the stage-1 model's mean-class error is 1.0 % on the training bank against 35.0 % on the "
        "validation bank, so the training bank shows 3 % of the bias; methods fitted on the training bank (DisAlign, LWS, "
        "cRT) cannot see the test-time bias there.")
    assert memorised.recommendation(validation_rows_in_fit=True) == (
        "recommendation: the fit trained on cross-fitted validation rows, the only ones that show the bias here; more "
        "validation rows help most, and disalign eval compares it with logit adjustment.")
    assert memorised.recommendation() == (
        "recommendation: give the fit held-out rows (disalign fit --val-weight regime, the default, trains on cross-fitted "
        "validation rows; a larger --val helps most) and compare with logit adjustment in disalign eval.")
    visible = Regime(0.66, 0.575, 0.34 / 0.425)
    assert visible.sentence() == (
        "regime: bias visible — the stage-1 model's mean-class error is 34.0 % on the training bank against 42.5 % on the "
        "validation bank, so the training bank shows 80 % of the bias, and methods fitted on the training bank (DisAlign, "
        "LWS, cRT) can learn it.")
    assert visible.recommendation() == visible.recommendation(validation_rows_in_fit=True) == (
        "recommendation: the default fit (DisAlign on the training bank, rho and alpha chosen on the validation bank).")
    assert visible.to_dict() == {"name": "bias-visible", "train_mean_class_accuracy": 0.66, "val_mean_class_accuracy": 0.575,
                                 "visible_share": 0.34 / 0.425, "memorised_below": MEMORISED_BELOW}
