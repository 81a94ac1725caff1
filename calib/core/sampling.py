"""Class-aware sampling and the epoch-wise cosine schedule of classifier re-training (LWS, cRT).

Reference: facebookresearch/classifier-balancing (Kang et al., ICLR 2020), ``data/ClassAwareSampler.py``
and ``run_networks.py`` with ``config/*/cls_{crt,lws}.yaml``.

Sampler. ``RandomCycleIter`` walks a list in a random order and reshuffles it after every full pass; the
sampler keeps one such cycle over the classes and one per class over its items. Each block of
``samples_per_class`` draws (``num_samples_cls: 4`` in every cls_*.yaml) takes the next class of the
class cycle, then that many consecutive items of the class's cycle: the classes come in turn, 4 samples
at a time, and every class is drawn equally often whatever its size. The sampler's length — one pass of
its iterator — is max_j n_j · C (C classes present). Its cycles keep their state from one epoch to the
next, as the reference's sampler object does. An item is an image; for banks with several augmented
views per image, :class:`ImageRows` picks one of its views at random each time the image is drawn.

Schedule. ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch: the learning rate is
constant within an epoch, lr_e = lr · (1 + cos(π e / E)) / 2 for epochs e = 0 … E−1 (the 0-based
epochs of the PyTorch 0.4 scheduler the reference was written for; cvpods's ``EPOCH_WISE`` cosine is
the same).
"""

from __future__ import annotations

import math

import torch

from disalign.calib.errors import InputError


def epoch_cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of 0-based ``epoch`` of ``epochs``: base_lr · (1 + cos(π·epoch/epochs)) / 2."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


class _Cycle:
    """``RandomCycleIter`` over 0 … n−1: a random order, a fresh random order after each full pass."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator
        self.order = torch.empty(0, dtype=torch.int64)  # the current pass
        self.pos = 0  # next position in it

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` values (count,) int64."""
        head = self.order[self.pos : self.pos + count]
        self.pos += head.numel()
        missing = count - head.numel()
        if missing <= 0:
            return head
        passes = math.ceil(missing / self.n)  # fresh passes, generated at once
        fresh = torch.rand(passes, self.n, generator=self.generator).argsort(dim=1)
        self.order, self.pos = fresh[-1], missing - (passes - 1) * self.n
        return torch.cat([head, fresh.flatten()[:missing]])


class ClassAwareSampler:
    """Draws item indices class by class, ``samples_per_class`` at a time (module docstring).

    labels (M,) int64 >= 0: the class of each of the M items. ``num_samples`` = max_j n_j · C.
    """

    def __init__(self, labels: torch.Tensor, *, samples_per_class: int = 4, generator: torch.Generator):
        if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
            raise InputError(f"samples_per_class should be an integer >= 1, found {samples_per_class!r}.")
        if labels.numel() == 0 or int(labels.min()) < 0:
            raise InputError("the class-aware sampler needs at least one item, all with a label >= 0.")
        self.samples_per_class = samples_per_class
        self.classes, counts = torch.unique(labels, return_counts=True)  # (C,), (C,)
        self.members = torch.argsort(labels, stable=True).split(counts.tolist())  # items of each class
        self.num_samples = int(counts.max()) * self.classes.numel()
        self._class_cycle = _Cycle(self.classes.numel(), generator)
        self._item_cycles = [_Cycle(int(n), generator) for n in counts]

    def draw(self, count: int) -> torch.Tensor:
        """The next ``count`` item indices (count,) int64, continuing the cycles where they stopped.

        A draw always starts a new block (the reference starts a new generator each epoch); a last
        partial block still advances its class's item cycle by a whole block, as the reference's zip does.
        """
        per_block = self.samples_per_class
        blocks = self._class_cycle.take(math.ceil(count / per_block))  # (B,) class positions, in order
        out = torch.empty(blocks.numel(), per_block, dtype=torch.int64)
        order = torch.argsort(blocks, stable=True)  # blocks grouped by class, in drawing order
        taken = torch.bincount(blocks, minlength=self.classes.numel())
        start = 0
        for c in torch.nonzero(taken).flatten().tolist():
            m = int(taken[c])
            items = self._item_cycles[c].take(m * per_block).view(m, per_block)
            out[order[start : start + m]] = self.members[c][items]
            start += m
        return out.flatten()[:count]


class ImageRows:
    """The labelled images of a bank as sampler items, and one of their rows (views) per draw.

    labels, sample_index, view: (N,) bank columns. Items are the distinct ``sample_index`` values of the
    labelled rows; ``labels`` (M,) holds each image's label; ``rows(items, generator)`` returns one row
    per drawn item, a view chosen uniformly among the image's rows (the row itself for single-view banks).
    """

    def __init__(self, labels: torch.Tensor, sample_index: torch.Tensor, view: torch.Tensor):
        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
        if rows.numel() == 0 or int(view[rows].max()) == 0:
            self.sorted_rows, self.starts, self.sizes = rows, torch.arange(rows.numel()), torch.ones(rows.numel(), dtype=torch.int64)
        else:
            self.sorted_rows = rows[torch.argsort(sample_index[rows], stable=True)]
            _, sizes = torch.unique_consecutive(sample_index[self.sorted_rows], return_counts=True)
            self.sizes = sizes
            self.starts = torch.cumsum(sizes, 0) - sizes
        self.labels = labels[self.sorted_rows[self.starts]]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def rows(self, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Bank rows (n,) int64 for drawn items (n,): a random view of each image."""
        sizes = self.sizes[items]
        if sizes.numel() == 0 or int(sizes.max()) == 1:
            return self.sorted_rows[self.starts[items]]
        offset = (torch.rand(items.numel(), generator=generator, dtype=torch.float64) * sizes).long()
        return self.sorted_rows[self.starts[items] + offset]
