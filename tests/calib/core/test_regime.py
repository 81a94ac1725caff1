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
        "recommendation: the fit trained on cross-fitted validation rows, the only ones that show the bias here, so the "
        "more of them the better; disalign eval compares it with logit adjustment.")
    assert memorised.recommendation() == (
        "recommendation: give the fit held-out rows (disalign fit --val-weight regime, the default, trains on cross-fitted "
        "validation rows of --val) and compare with logit adjustment in disalign eval.")
    visible = Regime(0.66, 0.575, 0.34 / 0.425)
    assert visible.sentence() == (
        "regime: bias visible — the stage-1 model's mean-class error is 34.0 % on the training bank against 42.5 % on the "
        "validation bank, so the training bank shows 80 % of the bias, and methods fitted on the training bank (DisAlign, "
        "LWS, cRT) can learn it.")
    assert visible.recommendation() == visible.recommendation(validation_rows_in_fit=True) == (
        "recommendation: the default fit (DisAlign on the training bank, rho and alpha chosen on the validation bank).")
    assert visible.to_dict() == {"name": "bias-visible", "train_mean_class_accuracy": 0.66, "val_mean_class_accuracy": 0.575,
                                 "visible_share": 0.34 / 0.425, "memorised_below": MEMORISED_BELOW}


def test_augmented_views_much_harder_than_held_out_images_are_named():
    from disalign.calib.core.regime import harder_views_warning

    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    view = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # Augmented views: class 0 half right, class 1 none right → mean-class accuracy 25 %, against 70 % held out.
    predicted = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0])
    assert harder_views_warning(predicted, labels, view, 0.70, 2) == (
        "the augmented views of the training bank are much harder for the stage-1 model than held-out images (mean-class "
        "accuracy 25.0 % against 70.0 % on the validation bank): the fit learns a correction for them that test images do "
        "not need; extract milder or fewer views (docs/extract.md).")
    assert harder_views_warning(predicted, labels, view, 0.35, 2) is None  # within 10 points of held-out images
    assert harder_views_warning(predicted, labels, torch.zeros(8, dtype=torch.int64), 0.70, 2) is None  # no augmented views


def test_the_fit_warns_about_augmented_views_harder_than_the_validation_bank():
    import warnings

    from disalign.calib.data.bank import Bank
    from disalign.calib.errors import DisalignWarning
    from disalign.calib.estimators.disalign import DisAlign

    generator = torch.Generator().manual_seed(0)
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([300, 150, 60]))
    features = torch.randn(labels.numel(), 6, generator=generator) + torch.nn.functional.one_hot(labels, 6).float()
    clean = 2.0 * torch.nn.functional.one_hot(labels, 3).float() + torch.randn(labels.numel(), 3, generator=generator)
    noise = torch.randn(labels.numel(), 3, generator=generator)  # augmented views: the model is at chance on them
    train = Bank.from_arrays(torch.cat([features, features]), torch.cat([clean, noise]), torch.cat([labels, labels]),
                             model_fingerprint="sha256:v")
    train.view = torch.repeat_interleave(torch.tensor([0, 1]), labels.numel())
    train.sample_index = torch.cat([torch.arange(labels.numel())] * 2)
    val = Bank.from_arrays(features[::3], clean[::3], labels[::3], model_fingerprint="sha256:v", role="val")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = DisAlign(rho_grid=(0.0, 1.0), epochs=1).fit(train, val).meta_.report
    assert any(w.category is DisalignWarning and "augmented views of the training bank are much harder" in str(w.message) for w in caught)
    assert any(text.startswith("the augmented views of the training bank are much harder") for text in report["warnings"])
