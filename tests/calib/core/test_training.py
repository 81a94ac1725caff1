import contextlib
import math
import os
import pty
import sys
import termios

import numpy as np
import pytest
import torch

from disalign.calib.core.training import RowSource, SGDRecipe, cosine_lr, epoch_rows, sgd_step
from disalign.calib.data.bank import BankReader
from disalign.calib.data.synthetic import write_synthetic_bank
from disalign.calib.errors import InputError


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


def tiny_fit(bank_path, progress: bool):
    from disalign.calib.estimators.disalign import DisAlign

    return DisAlign(rho=1.0, epochs=1).fit(bank_path, progress=progress)


def test_streamed_batches_visit_every_row_as_often_as_asked_with_prefetch(tmp_path):
    path = write_synthetic_bank(tmp_path / "b.h5", np.array([300, 120, 40]), feature_dim=8, chunk_rows=64)
    g = torch.Generator().manual_seed(0)
    with BankReader(path) as reader:
        labels = torch.from_numpy(reader.column("labels"))
        rows = torch.cat([torch.arange(labels.numel()), torch.arange(0, labels.numel(), 7)])  # some rows twice
        source = RowSource(reader=reader, window_rows=128)  # windows of 2 chunks, the next read while one trains
        batches = list(source.indexed_batches(rows, 50, g))
        bank = reader.load()
    assert [b[2].numel() for b in batches[:-1]] == [50] * (len(batches) - 1) and 0 < batches[-1][2].numel() <= 50
    seen = torch.cat([b[3] for b in batches])
    assert torch.equal(seen.sort().values, rows.sort().values)
    for features, logits, y, index in batches:  # every row carries its own data
        assert torch.equal(features, bank.features[index].float()) and torch.equal(logits, bank.logits[index])
        assert torch.equal(y, bank.labels[index])


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    path = write_synthetic_bank(tmp_path / "b.h5", np.array([60, 20]), feature_dim=4)
    tiny_fit(path, progress=True)
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    master, replica = pty.openpty()
    termios.tcsetwinsize(replica, (24, 120))  # a real terminal has a size (tqdm sizes the bar to it)
    with os.fdopen(replica, "w", encoding="utf-8") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        tiny_fit(path, progress=False)
        terminal.flush()
        os.set_blocking(master, False)
        with contextlib.suppress(BlockingIOError):
            assert os.read(master, 1 << 16) == b""  # quiet on request
        tiny_fit(path, progress=True)
        terminal.flush()
        shown = os.read(master, 1 << 16).decode()  # before the replica closes (then Linux answers EIO)
    os.close(master)
    assert "DisAlign fit, 1 heads" in shown and "epoch 1/1 loss" in shown


def test_hand_written_sgd_step_equals_torch_sgd_with_the_cosine_schedule():
    torch.manual_seed(0)
    start = {"a": torch.randn(3, 4), "b": torch.randn(3)}
    mine = {name: t.clone() for name, t in start.items()}
    theirs = {name: t.clone().requires_grad_(True) for name, t in start.items()}
    optimizer = torch.optim.SGD(list(theirs.values()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    total = 7
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    momenta: dict = {}
    for step in range(total):
        grads = {name: torch.randn_like(t) for name, t in start.items()}
        for name, t in theirs.items():
            t.grad = grads[name].clone()
        optimizer.step()
        scheduler.step()
        sgd_step(mine, grads, momenta, cosine_lr(0.1, step, total), 0.9, 5e-4)
    for name in start:
        assert torch.allclose(mine[name], theirs[name].detach(), atol=1e-6)
