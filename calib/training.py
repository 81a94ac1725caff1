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
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from calib.bank import Bank, BankReader
from calib.errors import InputError

SAMPLINGS = ("instance", "class-balanced")
# Below this many floats per batch (B·(K + d)) one thread is faster: synchronising the intra-op pool
# costs more than the work, and far more when other processes compete for the cores.
SINGLE_THREAD_BELOW = 1 << 19


def training_threads(batch_size: int, num_classes: int, feature_dim: int) -> int:
    """Intra-op threads for SGD steps of this size: 1 for small batches, else torch's current setting."""
    return 1 if batch_size * (num_classes + feature_dim) < SINGLE_THREAD_BELOW else torch.get_num_threads()


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    In memory the batches follow ``rows`` exactly. Streaming reads windows of randomly chosen whole
    chunks (about ``window_rows`` rows) and shuffles the rows within each window (block shuffling: each
    row is still visited exactly as often as in ``rows``, only the order differs).
    """

    def __init__(self, bank: Bank | None = None, reader: BankReader | None = None, window_rows: int | None = None):
        if (bank is None) == (reader is None):
            raise ValueError("RowSource needs exactly one of bank or reader")
        self.bank, self.reader = bank, reader
        self.window_rows = window_rows
        info = bank.info if bank is not None else reader.info
        self.num_classes, self.feature_dim = info.num_classes, info.feature_dim

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
        chunk, n = reader.info.chunk_rows, reader.info.num_rows
        # Banks are usually sorted by class, so a window is made of randomly chosen chunks from all
        # over the file rather than one contiguous range: batches then mix classes.
        chunks_per_window = max(1, (self.window_rows or chunk) // chunk)
        visits = torch.bincount(rows, minlength=n)  # how often each row is visited this epoch
        chunk_ids = torch.randperm(math.ceil(n / chunk), generator=generator)
        carry: tuple[torch.Tensor, ...] = ()  # < batch_size rows left over by the previous window
        for w in range(0, chunk_ids.numel(), chunks_per_window):
            selected = []
            for c in sorted(chunk_ids[w : w + chunks_per_window].tolist()):
                lo, hi = c * chunk, min((c + 1) * chunk, n)
                if int(visits[lo:hi].sum()):
                    selected.append((lo, hi, torch.repeat_interleave(torch.arange(hi - lo), visits[lo:hi])))
            if not selected:
                continue
            # Fill one preallocated window in shuffled order, a chunk at a time: the window is the only
            # large allocation, so memory stays at about window_rows rows.
            kept = carry[0].shape[0] if carry else 0
            total = kept + sum(local.numel() for _, _, local in selected)
            feats = torch.empty((total, reader.info.feature_dim), dtype=getattr(torch, reader.info.feature_dtype))
            logits = torch.empty((total, reader.info.num_classes), dtype=torch.float32)
            labels = torch.empty((total,), dtype=torch.int64)
            if carry:
                feats[:kept], logits[:kept], labels[:kept] = carry
            destination = kept + torch.randperm(total - kept, generator=generator)
            pos = 0
            for lo, hi, local in selected:
                block = reader.read_rows(lo, hi)
                dest = destination[pos : pos + local.numel()]
                feats[dest] = torch.from_numpy(block["features"])[local]
                logits[dest] = torch.from_numpy(block["logits"])[local]
                labels[dest] = torch.from_numpy(block["labels"])[local]
                pos += local.numel()
                del block
            full = total // batch_size * batch_size
            for start in range(0, full, batch_size):
                # Copies, not views: a batch still held by the caller must not pin the whole window.
                end = start + batch_size
                yield feats[start:end].float(), logits[start:end].clone(), labels[start:end].clone()
            carry = (feats[full:].clone(), logits[full:].clone(), labels[full:].clone()) if full < total else ()
            del feats, logits, labels
        if carry:
            yield carry[0].float(), carry[1], carry[2]


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
    with torch_threads(training_threads(recipe.batch_size, source.num_classes, source.feature_dim)):
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
