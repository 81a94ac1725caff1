import pytest
import torch

from calib.errors import InputError
from calib.training import SGDRecipe, epoch_rows


def test_one_random_view_per_image_and_no_unlabelled_rows():
    sample_index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    view = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 2, 2, 2, -1])
    g = torch.Generator().manual_seed(0)
    seen_views = set()
    for _ in range(20):
        rows = epoch_rows(labels, sample_index, view, "instance", g)
        assert sorted(sample_index[rows].tolist()) == [0, 1, 2]  # each labelled image once, image 3 never
        seen_views.update(view[rows].tolist())
    assert seen_views == {0, 1, 2}  # all views get used across epochs


def test_class_balanced_sampling_draws_classes_uniformly():
    labels = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(90, dtype=torch.long), torch.full((10,), 2)])
    rows = epoch_rows(labels, torch.arange(1000), torch.zeros(1000, dtype=torch.int16), "class-balanced", torch.Generator().manual_seed(0))
    assert rows.numel() == 1000
    share = torch.bincount(labels[rows], minlength=3).float() / 1000
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.05)


def test_recipe_validation():
    with pytest.raises(InputError, match="sampling should be one of instance, class-balanced, found 'uniform'"):
        SGDRecipe(sampling="uniform")
    with pytest.raises(InputError, match="epochs should be >= 1, found 0"):
        SGDRecipe(epochs=0)
