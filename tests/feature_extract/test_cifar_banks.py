"""End to end on the full shared CIFAR-10-LT IR50 lists (slow): the three banks (session fixture
``real_cifar_banks``, made by `disalign extract`), as make_banks.sh makes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from disalign.calib.data.bank import load_bank

from .conftest import REPO

EXAMPLES = REPO / "examples" / "cifar10lt"
CARD_COUNTS = [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]


@pytest.mark.slow
def test_full_cifar10lt_banks(real_cifar_banks):
    rows = {"train": 13996, "val": 200, "test": 9800}
    banks = {}
    for split, path in real_cifar_banks.items():
        banks[split] = bank = load_bank(path)
        assert bank.num_rows == rows[split] and bank.features.dtype == torch.float16 and bank.skipped.numel() == 0
        assert bank.info.class_counts.tolist() == CARD_COUNTS
    assert np.bincount(banks["test"].labels.numpy()).tolist() == [980] * 10
    top1 = (banks["test"].logits.argmax(1) == banks["test"].labels).float().mean().item()
    assert 0.67 < top1 < 0.70  # the card reports 68.58 % on all 10,000 test images; these are 9,800 of them
    for split, bank in banks.items():  # the committed demo banks are this extractor's output
        demo = load_bank(EXAMPLES / f"{split}.h5")
        assert torch.equal(demo.labels, bank.labels) and torch.equal(demo.sample_index, bank.sample_index)
        assert torch.allclose(demo.logits, bank.logits, atol=1e-4)
        assert torch.allclose(demo.features.float(), bank.features.float(), atol=1e-2, rtol=1e-3)
