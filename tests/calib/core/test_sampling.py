"""The class-aware sampler of classifier-balancing and the epoch-wise cosine schedule: epoch size,
per-class draws, blocks of 4 classes in turn, state kept across epochs, views of multi-view banks."""

from __future__ import annotations

import math

import pytest
import torch

from disalign.calib.core.sampling import ClassAwareSampler, ImageRows, epoch_cosine_lr
from disalign.calib.errors import InputError

LABELS = torch.tensor([0] * 8 + [1] * 4 + [2] * 1)  # n = 8, 4, 1


def sampler(seed: int = 0, labels: torch.Tensor = LABELS, per_class: int = 4) -> ClassAwareSampler:
    return ClassAwareSampler(labels, samples_per_class=per_class, generator=torch.Generator().manual_seed(seed))


def test_epoch_is_max_count_times_classes_and_every_class_is_drawn_equally():
    s = sampler()
    assert s.num_samples == 8 * 3
    items = s.draw(s.num_samples)
    assert items.shape == (24,)
    assert torch.bincount(LABELS[items]).tolist() == [8, 8, 8]
    # 8 draws of a class of 8 items visit each item once (one pass of its cycle), of a class of 4 twice,
    # of a class of 1 eight times
    assert sorted(items[LABELS[items] == 0].tolist()) == list(range(8))
    assert torch.bincount(items[LABELS[items] == 1]).tolist()[8:] == [2, 2, 2, 2]
    assert items[LABELS[items] == 2].tolist() == [12] * 8


def test_draws_come_in_blocks_of_four_with_the_classes_in_turn():
    items = sampler(seed=3).draw(48)
    blocks = LABELS[items].view(12, 4)
    assert (blocks == blocks[:, :1]).all()  # 4 draws of one class in a row
    passes = blocks[:, 0].view(4, 3)  # every 3 blocks, each class once (a pass of the class cycle)
    assert all(sorted(p.tolist()) == [0, 1, 2] for p in passes)
    assert len({tuple(p.tolist()) for p in passes}) > 1  # each pass is a fresh random order


def test_the_cycles_continue_across_epochs_as_the_reference_sampler_object():
    s = sampler(seed=1)
    first, second = s.draw(12), s.draw(12)  # 4 draws of class 0 in each: together one pass over its 8 items
    together = torch.cat([first, second])
    assert sorted(together[LABELS[together] == 0].tolist()) == list(range(8))
    assert torch.bincount(LABELS[together]).tolist() == [8, 8, 8]
    assert torch.equal(first, sampler(seed=1).draw(12))  # seeded
    assert not torch.equal(first, sampler(seed=2).draw(12))


def test_a_partial_last_block_and_other_block_sizes():
    items = sampler(per_class=1).draw(7)
    assert items.shape == (7,)
    labels = LABELS[items].tolist()
    assert sorted(labels[:3]) == sorted(labels[3:6]) == [0, 1, 2]  # one class at a time, in turn


def test_classes_with_gaps_in_the_label_range():
    labels = torch.tensor([5, 5, 9, 9, 9, 9])
    s = sampler(labels=labels)
    assert s.num_samples == 4 * 2
    assert torch.bincount(labels[s.draw(8)], minlength=10)[[5, 9]].tolist() == [4, 4]


def test_bad_sampler_inputs_are_named():
    with pytest.raises(InputError, match=r"samples_per_class should be an integer >= 1, found 0\."):
        sampler(per_class=0)
    with pytest.raises(InputError, match=r"the class-aware sampler needs at least one item, all with a label >= 0\."):
        sampler(labels=torch.tensor([0, -1]))


def test_image_rows_pick_one_view_of_the_drawn_image():
    # images 0, 1, 2 with 3, 1 and 2 views; row 6 is unlabelled
    sample_index = torch.tensor([0, 1, 0, 2, 0, 2, 3])
    view = torch.tensor([0, 0, 1, 0, 2, 1, 0], dtype=torch.int16)
    labels = torch.tensor([4, 7, 4, 1, 4, 1, -1])
    images = ImageRows(labels, sample_index, view)
    assert len(images) == 3 and images.labels.tolist() == [4, 7, 1]
    generator = torch.Generator().manual_seed(0)
    rows = images.rows(torch.tensor([0] * 200 + [1, 2] * 50), generator)
    assert set(rows[:200].tolist()) == {0, 2, 4}  # every view of image 0 comes up
    assert set(rows[200::2].tolist()) == {1} and set(rows[201::2].tolist()) == {3, 5}


def test_image_rows_of_a_single_view_bank_are_its_labelled_rows():
    labels = torch.tensor([2, -1, 0, 2])
    images = ImageRows(labels, torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.int16))  # pixel bank: 2 images, 4 rows
    assert images.labels.tolist() == [2, 0, 2]
    assert images.rows(torch.tensor([2, 0, 1]), torch.Generator()).tolist() == [3, 0, 2]


def test_epoch_wise_cosine():
    assert [epoch_cosine_lr(0.2, e, 4) for e in range(4)] == pytest.approx([0.2, 0.2 * (1 + math.sqrt(0.5)) / 2, 0.1, 0.2 * (1 - math.sqrt(0.5)) / 2])
