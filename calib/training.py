"""Mini-batch SGD over cached bank rows: the stage-2 recipe shared by DisAlign, LWS and cRT.

Nothing here touches a backbone: batches are rows of (features, logits, labels) gathered from a bank
held in memory, or streamed from the HDF5 file in windows of whole chunks when the bank is larger than
the memory budget. Runs are seeded and deterministic (CPU).

Per epoch, a multi-view bank contributes one randomly chosen view per image (augmentation without
backbone passes); ``sampling="class-balanced"`` draws classes uniformly, then an instance of the class
(the classifier-balancing recipe for LWS/cRT).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from calib.bank import Bank, BankReader
from calib.errors import InputError

SAMPLINGS = ("instance", "class-balanced")


@dataclass(frozen=True)
class SGDRecipe:
    """Official DisAlign stage 2: SGD momentum 0.9, lr 0.1, wd 5e-4, cosine schedule, 10 epochs, batch 256."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    sampling: str = "instance"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError(f"epochs should be >= 1, found {self.epochs}.")
        if self.batch_size < 1:
            raise InputError(f"batch_size should be >= 1, found {self.batch_size}.")
        if self.lr <= 0:
            raise InputError(f"lr should be > 0, found {self.lr}.")
        if self.sampling not in SAMPLINGS:
            raise InputError(f"sampling should be one of {', '.join(SAMPLINGS)}, found {self.sampling!r}.")


def epoch_rows(
    labels: torch.Tensor, sample_index: torch.Tensor, view: torch.Tensor, sampling: str, generator: torch.Generator
) -> torch.Tensor:
    """Row indices (M,) int64 visited in one epoch, in random order; unlabelled rows are never visited.

    labels, sample_index, view: (N,). Multi-view banks: one random view per image. Class-balanced:
    M = number of images, each draw picks a class uniformly, then one of its rows uniformly.
    """
    rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
    if int(view.max()) > 0:
        # One random view per image: order by (image, random key) and keep the first row of each image.
        key = torch.rand(rows.numel(), generator=generator, dtype=torch.float64)
        order = torch.argsort(key)
        order = order[torch.argsort(sample_index[rows][order], stable=True)]
        rows = rows[order]
        first = torch.ones(rows.numel(), dtype=torch.bool)
        first[1:] = sample_index[rows][1:] != sample_index[rows][:-1]
        rows = rows[first]
    if sampling == "class-balanced":
        y = labels[rows]
        present = torch.unique(y)
        by_class = rows[torch.argsort(y, stable=True)]
        counts = torch.bincount(y, minlength=int(present.max()) + 1)
        starts = torch.cumsum(counts, 0) - counts
        draws = present[torch.randint(present.numel(), (rows.numel(),), generator=generator)]
        offset = (torch.rand(rows.numel(), generator=generator, dtype=torch.float64) * counts[draws]).long()
        return by_class[starts[draws] + offset]
    return rows[torch.randperm(rows.numel(), generator=generator)]


class RowSource:
    """Where batches come from: an in-memory :class:`Bank`, or a bank file streamed in windows.

    ``batches(rows, batch_size, generator)`` yields ``(features float32 (B, d), logits (B, K), labels (B,))``.
    In memory the batches follow ``rows`` exactly. Streaming sorts the epoch's rows into windows of
    contiguous chunks that fit ``window_rows``, visits the windows in random order and shuffles rows
    within each window (block shuffling: each row is still visited exactly as often as in ``rows``).
    """

    def __init__(self, bank: Bank | None = None, reader: BankReader | None = None, window_rows: int | None = None):
        if (bank is None) == (reader is None):
            raise ValueError("RowSource needs exactly one of bank or reader")
        self.bank, self.reader = bank, reader
        self.window_rows = window_rows

    def batches(self, rows: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.bank is not None:
            bank = self.bank
            for start in range(0, rows.numel(), batch_size):
                idx = rows[start : start + batch_size]
                yield bank.features[idx].float(), bank.logits[idx], bank.labels[idx]
            return
        yield from self._streamed(rows, batch_size, generator)

    def _streamed(self, rows: torch.Tensor, batch_size: int, generator: torch.Generator):
        reader = self.reader
        assert reader is not None
        chunk = reader.info.chunk_rows
        window = max(chunk, (self.window_rows or chunk) // chunk * chunk)
        sorted_rows = torch.sort(rows).values.numpy()
        num_windows = math.ceil(reader.info.num_rows / window)
        carry: list[torch.Tensor] = []  # leftover rows of the last window join the next
        for w in torch.randperm(num_windows, generator=generator).tolist():
            lo, hi = w * window, min((w + 1) * window, reader.info.num_rows)
            a, b = np.searchsorted(sorted_rows, [lo, hi])
            if a == b:
                continue
            block = reader.read_rows(lo, hi)
            local = torch.from_numpy(sorted_rows[a:b] - lo)
            local = local[torch.randperm(local.numel(), generator=generator)]
            feats = torch.from_numpy(block["features"])[local].float()
            logits = torch.from_numpy(block["logits"])[local]
            labels = torch.from_numpy(block["labels"])[local]
            if carry:
                feats, logits, labels = (torch.cat([c, x]) for c, x in zip(carry, (feats, logits, labels), strict=True))
                carry = []
            full = feats.shape[0] // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield feats[start : start + batch_size], logits[start : start + batch_size], labels[start : start + batch_size]
            if full < feats.shape[0]:
                carry = [feats[full:], logits[full:], labels[full:]]
        if carry:
            yield carry[0], carry[1], carry[2]


def run_sgd(
    params: dict[str, torch.Tensor],
    loss_fn: Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    source: RowSource,
    labels: torch.Tensor,
    sample_index: torch.Tensor,
    view: torch.Tensor,
    recipe: SGDRecipe,
    frozen: tuple[str, ...] = (),
) -> dict[str, list[float]]:
    """Optimise ``params`` in place with SGD + cosine schedule; returns per-epoch loss and seconds.

    ``loss_fn(params, features (B, d) float32, logits (B, K), labels (B,)) -> scalar``. Parameters named
    in ``frozen`` keep their initial value (ablations).
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    trainable = [t.requires_grad_(True) for name, t in params.items() if name not in frozen]
    optimizer = torch.optim.SGD(trainable, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, math.ceil(int((labels >= 0).sum()) / recipe.batch_size))
    if int(view.max()) > 0:
        steps_per_epoch = max(1, math.ceil(int(torch.unique(sample_index[labels >= 0]).numel()) / recipe.batch_size))
    total_steps = recipe.epochs * steps_per_epoch
    # Cosine decay to 0 over all steps, per iteration (as the official stage-2 schedulers).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    history: dict[str, list[float]] = {"loss": [], "seconds": []}
    for _epoch in range(recipe.epochs):
        start = time.perf_counter()
        rows = epoch_rows(labels, sample_index, view, recipe.sampling, generator)
        total, count = 0.0, 0
        for feats, logits, y in source.batches(rows, recipe.batch_size, generator):
            loss = loss_fn(params, feats, logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * y.numel()
            count += y.numel()
        history["loss"].append(total / max(count, 1))
        history["seconds"].append(time.perf_counter() - start)
    for t in params.values():
        t.requires_grad_(False)
    return history
