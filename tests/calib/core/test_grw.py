import pytest
import torch
import torch.nn.functional as F

from disalign.calib.core.grw import grw_cross_entropy, grw_weights
from disalign.calib.errors import InputError


def test_weights_hand_computed():
    # r = [.6, .3, .1]; 1/r = [5/3, 10/3, 10]; normalised to sum K=3: [1/3, 2/3, 2]
    assert torch.allclose(grw_weights([6, 3, 1], 1.0), torch.tensor([1 / 3, 2 / 3, 2.0]))
    assert torch.allclose(grw_weights([6, 3, 1], 0.0), torch.ones(3))
    # ρ = 0.5: (1/r)^.5 = [1.2910, 1.8257, 3.1623], sum 6.2790 → ×3/sum
    expected = torch.tensor([1.2909944, 1.8257419, 3.1622777]) / 6.279014 * 3
    assert torch.allclose(grw_weights([6, 3, 1], 0.5), expected, atol=1e-6)


def test_weights_average_to_one():
    w = grw_weights([1280, 400, 37, 5], 1.7)
    assert torch.isclose(w.mean(), torch.tensor(1.0))


def test_background_weight_is_one_and_foreground_normalised_over_k():
    # foreground r = [2/3, 1/3] → 1/r = [1.5, 3] → ×2/4.5 = [2/3, 4/3]; background = 1 whatever its count
    w = grw_weights([6, 3, 1_000_000], 1.0, background_index=2)
    assert torch.allclose(w, torch.tensor([2 / 3, 4 / 3, 1.0]))
    w0 = grw_weights([0, 6, 3], 2.0, background_index=0)
    assert float(w0[0]) == 1.0


def test_zero_count_class_is_a_clear_error_unless_smoothed():
    with pytest.raises(InputError, match=r"^class_counts: 1 of 3 classes has no training samples \(class 2\), so its GRW weight"):
        grw_weights([6, 3, 0], 1.0)
    w = grw_weights([6, 3, 0], 1.0, count_smoothing=1.0)  # counts [7, 4, 1]
    inv = torch.tensor([12 / 7, 12 / 4, 12.0])
    assert torch.allclose(w, inv / inv.sum() * 3)
    assert torch.equal(grw_weights([6, 3, 0], 0.0), torch.ones(3))  # ρ = 0 needs no frequencies


def test_many_empty_classes_are_counted_not_just_the_first_ten():
    """Issue 21 §5: the error showed 10 of 990 empty classes without the count, and suggested a setting with no flag."""
    with pytest.raises(InputError) as info:
        grw_weights([5] * 10 + [0] * 990, 1.0)
    assert str(info.value) == ("class_counts: 990 of 1000 classes have no training samples (classes 10, 11, 12, 13, 14, 15, 16, 17, "
                               "18, 19 and 980 more), so their GRW weight is infinite; add training samples or pass count_smoothing "
                               "> 0 (disalign fit --count-smoothing).")


def test_negative_rho_rejected():
    with pytest.raises(InputError, match="rho should be >= 0, found -1"):
        grw_weights([1, 2], -1)


def test_loss_is_weighted_mean_and_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(7, 3)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    w = grw_weights([6, 3, 1], 1.0)
    per_sample = -torch.log_softmax(logits, 1)[torch.arange(7), labels]
    manual = (w[labels] * per_sample).sum() / w[labels].sum()
    assert torch.allclose(grw_cross_entropy(logits, labels, w), manual)
    assert torch.allclose(grw_cross_entropy(logits, labels, w), F.cross_entropy(logits, labels, weight=w))
    assert torch.allclose(grw_cross_entropy(logits, labels, grw_weights([6, 3, 1], 0.0)), F.cross_entropy(logits, labels))
