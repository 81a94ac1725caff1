import numpy as np
import pytest
import torch

from disalign.calib.core.crossfit import HeadPlan, HeadSpec, HeldOutRows
from disalign.calib.data.bank import load_bank, write_bank
from disalign.calib.estimators.disalign import DisAlign


def test_plan_lists_one_kept_head_and_one_head_per_left_out_fold():
    plan = HeadPlan.make((0.5, 1.0), (0.0, 0.3), folds=2, magnitudes=(True, False))
    assert len(plan) == 2 * 2 * (1 + (1 + 2))  # magnitudes × ρ × (λ = 0: one head; λ = 0.3: kept head + 2 folds)
    assert plan.specs[:4] == (HeadSpec(0.5, 0.0), HeadSpec(0.5, 0.3), HeadSpec(0.5, 0.3, 0), HeadSpec(0.5, 0.3, 1))
    kept = [spec for spec, _ in plan.candidates()]
    assert kept == [HeadSpec(r, w, None, m) for m in (True, False) for r in (0.5, 1.0) for w in (0.0, 0.3)]
    assert plan.rhos == (0.5, 1.0) and plan.mixes_val
    assert plan.magnitudes.tolist() == [True] * 8 + [False] * 8


def test_row_weights_give_validation_rows_their_share_of_the_loss():
    plan = HeadPlan.make((1.0,), (0.0, 0.25), folds=2)  # heads: λ=0, λ=.25 kept, λ=.25 without fold 0, without fold 1
    class_weights = {1.0: torch.tensor([0.5, 1.5])}
    labels = torch.tensor([0, 0, 0, 1, -1, 0, 1, 1])  # 5 training rows (one unlabelled), then 3 validation rows
    held_out = HeldOutRows(torch.zeros(3, 2), torch.zeros(3, 2), labels[5:], fold=torch.tensor([0, 1, 0]))
    table = plan.row_weights(class_weights, labels, held_out)[torch.arange(8)]
    assert torch.allclose(table[0], torch.tensor([0.5, 0.5, 0.5, 1.5, 0.5, 0, 0, 0]))  # GRW weight, validation rows unused
    # λ = .25: 4 labelled training rows, Σw = 3 → training rows .75·w·4/3, every validation row .25·4/3
    assert torch.allclose(table[1, :4], 0.75 * torch.tensor([0.5, 0.5, 0.5, 1.5]) * 4 / 3)
    assert torch.allclose(table[1, 5:], torch.full((3,), 0.25 * 4 / 3))
    labelled = torch.tensor([True, True, True, True, False, True, True, True])
    for r in (1, 2, 3):  # validation rows carry the share λ of the labelled rows' total weight
        assert float(table[r, 5:].sum() / table[r, labelled].sum()) == pytest.approx(0.25)
    assert table[2, 5:].tolist() == [0.0, pytest.approx(0.25 * 4), 0.0]  # without fold 0: only the fold-1 row
    assert table[3, 6] == 0.0 and table[3, 5] == table[3, 7] > 0


def test_held_out_rows_are_the_clean_labelled_rows_in_stratified_folds(tmp_path):
    labels = np.repeat(np.arange(3), 10)
    labels[0] = -1  # unlabelled
    write_bank(tmp_path / "v.h5", np.random.default_rng(0).normal(size=(60, 4)), np.zeros((60, 3)), np.concatenate([labels, labels]),
               sample_index=np.concatenate([np.arange(30)] * 2), view=np.repeat([0, 1], 30))
    rows = HeldOutRows.from_bank(load_bank(tmp_path / "v.h5"), 3, torch.Generator().manual_seed(0))
    assert rows.count == 29 and torch.equal(rows.labels, torch.from_numpy(labels[1:]))
    for c in range(3):  # each class dealt round-robin: fold sizes differ by at most one
        sizes = torch.bincount(rows.fold[rows.labels == c], minlength=3)
        assert int(sizes.max() - sizes.min()) <= 1


def test_validation_rows_in_the_fit_are_scored_out_of_fold(lt_banks):
    est = DisAlign(rho="auto", rho_grid=(0.5, 1.5), epochs=2, val_weight=0.3, val_folds=3, use_magnitude=True).fit(
        lt_banks["train"], val=lt_banks["val"])
    report = est.meta_.report
    assert [(p["rho"], p["val_weight"], p["cross_fitted"]) for p in report["rho_curve"]] == [(0.5, 0.3, True), (1.5, 0.3, True)]
    assert report["val_weight"] == 0.3 and report["validation"]["cross_fitted"]
    # the kept head trained on every validation row: it fits them better than its out-of-fold score says
    val = load_bank(lt_banks["val"])
    z = est.predict_logits(val.features.float(), val.logits)
    in_sample = float(torch.nn.functional.cross_entropy(z, val.labels))
    assert in_sample < report["validation"]["val_nll"]
    auto = DisAlign(rho=1.0, epochs=2, val_weight="auto", val_folds=3, use_magnitude=True).fit(lt_banks["train"], val=lt_banks["val"])
    assert [p["val_weight"] for p in auto.meta_.report["rho_curve"]] == [0.0, 0.1, 0.3]
    assert "cross_fitted" not in auto.meta_.report["rho_curve"][0]  # λ = 0 is scored on the validation bank directly


@pytest.mark.parametrize("form", ["residual", "blend"])
def test_the_validation_bank_chooses_whether_the_magnitude_term_helps(lt_banks, form):
    est = DisAlign(rho="auto", rho_grid=(1.0, 2.0), epochs=2, use_magnitude="auto", head_form=form).fit(lt_banks["train"], val=lt_banks["val"])
    curve = est.meta_.report["rho_curve"]
    assert [(p["rho"], p["magnitude"]) for p in curve] == [(1.0, True), (2.0, True), (1.0, False), (2.0, False)]
    best = min(curve, key=lambda p: (p["val_nll"], -p["val_mean_class_accuracy"]))
    assert (est.meta_.report["rho"], est.meta_.report["magnitude"]) == (best["rho"], best["magnitude"])
    # each candidate equals the fit with that setting alone (where α is frozen, not trained: weight decay included)
    for point in curve:
        alone = DisAlign(rho=point["rho"], epochs=2, use_magnitude=point["magnitude"], head_form=form).fit(
            lt_banks["train"], val=lt_banks["val"])
        assert alone.meta_.report["validation"]["val_nll"] == pytest.approx(point["val_nll"], abs=1e-5)
        if not point["magnitude"]:
            assert torch.equal(alone.params_["alpha"], torch.full((10,), 1.0 if form == "blend" else 0.0))


def test_tempered_nll_takes_the_logit_scale_out_of_the_score():
    from disalign.calib.core.crossfit import logit_scores
    from disalign.calib.core.label_shift import fit_temperature

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=generator)
    logits = torch.randn(400, 5, generator=generator) + 2.0 * torch.nn.functional.one_hot(labels, 5)
    base, scaled = logit_scores(logits, labels), logit_scores(4.0 * logits, labels)
    # Four times the scale: plain NLL gets much worse, the tempered NLL does not move (same ranking).
    assert scaled["val_nll"] > base["val_nll"] + 0.1
    assert scaled["val_nll_tempered"] == pytest.approx(base["val_nll_tempered"], abs=1e-4)
    assert scaled["val_temperature"] == pytest.approx(4.0 * base["val_temperature"], rel=1e-3)
    # It is the NLL at the candidate's own fitted temperature, and never above the plain NLL.
    t = fit_temperature(logits, labels)
    assert base["val_nll_tempered"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits / t, labels)), abs=1e-6)
    assert base["val_nll_tempered"] <= base["val_nll"] + 1e-6


def test_row_weights_with_more_folds_than_classes():
    """Two classes, five folds: a validation row's key is its fold (0..4), which once indexed the (R, K) class
    weights directly and ran past K = 2 (IndexError on a two-class bank with validation rows in the fit)."""
    plan = HeadPlan.make((1.0,), (0.5,), folds=5)  # the kept head, then one head per left-out fold
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 1, 0])  # 3 training rows, then 5 validation rows
    held_out = HeldOutRows(torch.zeros(5, 3), torch.zeros(5, 2), labels[3:], fold=torch.arange(5))
    weights = plan.row_weights({1.0: torch.tensor([0.25, 1.75])}, labels, held_out)[torch.arange(8)]
    assert weights.shape == (6, 8)
    # Training rows: (1 − λ)·w·N/Σw with N = 3, Σw = 3.75.
    assert torch.allclose(weights[:, :3], torch.tensor([[0.25, 1.75, 1.75]] * 6) * 0.5 * 3 / 3.75)
    # Validation rows: λ·N/n_seen; the kept head sees all 5, head f sees 4 and leaves fold f out.
    expected = torch.full((6, 5), 0.5 * 3 / 4)
    expected[0] = 0.5 * 3 / 5
    expected[torch.arange(1, 6), torch.arange(5)] = 0.0
    assert torch.allclose(weights[:, 3:], expected)
