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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from disalign.calib.data.bank import Bank, BankReader
from disalign.calib.errors import InputError
from disalign.calib.progress import progress_bar

SAMPLINGS = ("instance", "class-balanced")
# features float32 (B, d), logits (B, K), labels (B,), the rows' indices in the bank (B,) int64
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
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

    ``batches(rows, batch_size, generator)`` yields ``(features float32 (B, d), logits (B, K), labels (B,))``;
    ``indexed_batches`` adds each row's index in the bank (B,) int64. In memory the batches follow ``rows``
    exactly. Streaming reads windows of randomly chosen whole chunks (about ``window_rows`` rows, chunks
    read in file order) and shuffles the rows within each window (block shuffling: each row is still
    visited exactly as often as in ``rows``, only the order differs); the next window is read on a thread
    while the current one trains, so two windows are in memory at the peak. Each chunk's values are
    validated once per source (the first epoch), not at every epoch.
    """

    def __init__(self, bank: Bank | None = None, reader: BankReader | None = None, window_rows: int | None = None):
        if (bank is None) == (reader is None):
            raise ValueError("RowSource needs exactly one of bank or reader")
        self.bank, self.reader = bank, reader
        self.window_rows = window_rows
        self._validated: set[int] = set()  # first rows of the chunks whose values were checked (streaming)
        self._windows: list[Batch] = []  # the two window buffers of a streamed source
        info = bank.info if bank is not None else reader.info
        self.num_classes, self.feature_dim = info.num_classes, info.feature_dim

    def batches(self, rows: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for features, logits, labels, _ in self.indexed_batches(rows, batch_size, generator):
            yield features, logits, labels

    def indexed_batches(self, rows: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        if self.bank is not None:
            bank = self.bank
            for start in range(0, rows.numel(), batch_size):
                idx = rows[start : start + batch_size]
                yield bank.features[idx].float(), bank.logits[idx], bank.labels[idx], idx
            return
        yield from self._streamed(rows, batch_size, generator)

    def predicted_classes(self) -> torch.Tensor:
        """The stage-1 model's predicted class (argmax of the stored logits) of every row (N,) int64; a streamed
        source reads the logits chunk by chunk."""
        if self.bank is not None:
            return self.bank.logits.argmax(1)
        reader = self.reader
        assert reader is not None
        chunk, n = reader.info.chunk_rows, reader.info.num_rows
        predicted = torch.empty(n, dtype=torch.int64)
        buffer = np.empty((chunk, reader.info.num_classes), dtype=np.float32)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            reader.read_rows_into(lo, hi, {"logits": buffer[: hi - lo]}, validate=False)
            predicted[lo:hi] = torch.from_numpy(buffer[: hi - lo]).argmax(1)
        return predicted

    def sample_features(self, max_rows: int, generator: torch.Generator) -> torch.Tensor:
        """Up to ``max_rows`` rows of features (n, d) float32 from all over the bank: a random subset in memory,
        evenly spaced whole chunks when streaming (one read of about ``max_rows`` rows)."""
        if self.bank is not None:
            n = self.bank.num_rows
            rows = torch.arange(n) if n <= max_rows else torch.randperm(n, generator=generator)[:max_rows].sort().values
            return self.bank.features[rows].float()
        reader = self.reader
        assert reader is not None
        chunk, n = reader.info.chunk_rows, reader.info.num_rows
        num_chunks = math.ceil(n / chunk)
        picked = torch.linspace(0, num_chunks - 1, min(num_chunks, math.ceil(max_rows / chunk))).round().long().unique()
        blocks = [reader.read_rows(c * chunk, min((c + 1) * chunk, n))["features"] for c in picked.tolist()]
        return torch.from_numpy(np.concatenate(blocks)).float()

    def _streamed(self, rows: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        reader = self.reader
        assert reader is not None
        chunk, n = reader.info.chunk_rows, reader.info.num_rows
        # Banks are usually sorted by class, so a window is made of randomly chosen chunks from all
        # over the file rather than one contiguous range: batches then mix classes.
        chunks_per_window = max(1, (self.window_rows or chunk) // chunk)
        visits = torch.bincount(rows, minlength=n)  # how often each row is visited this epoch
        chunk_ids = torch.randperm(math.ceil(n / chunk), generator=generator)
        plans = []  # every random draw is made here, before any read, so thread timing cannot change the order
        for w in range(0, chunk_ids.numel(), chunks_per_window):
            ranges, order, pos = [], [], 0
            for c in sorted(chunk_ids[w : w + chunks_per_window].tolist()):  # file order within a window
                lo, hi = c * chunk, min((c + 1) * chunk, n)
                if int(visits[lo:hi].sum()):
                    ranges.append((lo, hi))
                    order.append(pos + torch.repeat_interleave(torch.arange(hi - lo), visits[lo:hi]))
                    pos += hi - lo
            if ranges:
                order = torch.cat(order)
                plans.append((ranges, order[torch.randperm(order.numel(), generator=generator)]))
        pending: Batch | None = None  # < batch_size rows left over by the previous window
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="disalign-prefetch") as pool:
            future = pool.submit(self._read_window, plans[0][0], 0) if plans else None
            for i, (_, order) in enumerate(plans):
                feats, logits, labels, row_ids = future.result()
                # Window i + 1 goes into the other buffer; window i - 1's, which it reuses, is consumed.
                future = pool.submit(self._read_window, plans[i + 1][0], (i + 1) % 2) if i + 1 < len(plans) else None
                start, total = 0, order.numel()
                if pending is not None:
                    start = min(batch_size - pending[2].numel(), total)
                    head = order[:start]
                    pending = (torch.cat([pending[0], feats[head].float()]), torch.cat([pending[1], logits[head]]),
                               torch.cat([pending[2], labels[head]]), torch.cat([pending[3], row_ids[head]]))
                    if pending[2].numel() < batch_size:
                        continue
                    yield pending
                    pending = None
                for s in range(start, total, batch_size):
                    idx = order[s : s + batch_size]  # gathers are copies: a held batch never pins the window
                    batch = feats[idx].float(), logits[idx], labels[idx], row_ids[idx]
                    if idx.numel() < batch_size:
                        pending = batch
                    else:
                        yield batch
                del feats, logits, labels, row_ids
        if pending is not None:
            yield pending

    def _read_window(self, ranges: list[tuple[int, int]], slot: int) -> Batch:
        """The rows of the chunks ``ranges`` (in file order), read one chunk at a time straight into window
        buffer ``slot`` (0 or 1: one trains while the other is filled). The two buffers are allocated once per
        source, so no epoch page-faults a fresh window in. Values are validated the first time a chunk is read."""
        reader = self.reader
        assert reader is not None
        total = sum(hi - lo for lo, hi in ranges)
        if not self._windows or self._windows[0][0].shape[0] < total:
            rows = max(total, (self.window_rows or 0) // reader.info.chunk_rows * reader.info.chunk_rows)
            self._windows = [(torch.empty((rows, reader.info.feature_dim), dtype=getattr(torch, reader.info.feature_dtype)),
                              torch.empty((rows, reader.info.num_classes), dtype=torch.float32),
                              torch.empty((rows,), dtype=torch.int64), torch.empty((rows,), dtype=torch.int64)) for _ in range(2)]
        feats, logits, labels, row_ids = (t[:total] for t in self._windows[slot])
        arrays = {"features": feats.numpy(), "logits": logits.numpy(), "labels": labels.numpy()}
        pos = 0
        for lo, hi in ranges:
            end = pos + hi - lo
            reader.read_rows_into(lo, hi, {name: array[pos:end] for name, array in arrays.items()}, validate=lo not in self._validated)
            self._validated.add(lo)
            row_ids[pos:end] = torch.arange(lo, hi)
            pos = end
        return feats, logits, labels, row_ids


def steps_per_epoch(labels: torch.Tensor, sample_index: torch.Tensor, view: torch.Tensor, batch_size: int) -> int:
    """SGD steps in one epoch: labelled images (one view each) / batch size, rounded up."""
    labelled = labels >= 0
    count = int(torch.unique(sample_index[labelled]).numel()) if int(view.max()) > 0 else int(labelled.sum())
    return max(1, math.ceil(count / batch_size))


def run_stacked_sgd(
    params: dict[str, torch.Tensor],
    loss_and_grads: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
    source: RowSource,
    labels: torch.Tensor,
    sample_index: torch.Tensor,
    view: torch.Tensor,
    recipe: SGDRecipe,
    frozen: tuple[str, ...] = (),
    *,
    progress: bool = False,
    description: str = "fit",
) -> dict[str, list]:
    """SGD + cosine schedule (decay to 0 over all steps, per step, as the official stage-2 schedulers) on R
    stacked heads whose gradients are given.

    ``loss_and_grads(params, features (B, d), logits (B, K), labels (B,), rows (B,)) -> (losses (R,),
    grads)`` returns every head's loss and the gradient of each trainable parameter. Momentum and weight
    decay act elementwise, so each head follows exactly the path it would follow alone. Returns the
    per-epoch mean losses (R,) as lists and the epoch seconds. ``progress`` shows a bar on stderr (epoch,
    step, loss range over the heads) when stderr is a terminal.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    trainable = {name: t for name, t in params.items() if name not in frozen}
    momenta: dict[str, torch.Tensor] = {}
    per_epoch = steps_per_epoch(labels, sample_index, view, recipe.batch_size)
    total_steps = recipe.epochs * per_epoch
    history: dict[str, list] = {"loss": [], "seconds": []}
    bar = progress_bar(total=total_steps, enabled=progress, desc=description, unit="step")
    step = 0
    with bar, torch_threads(training_threads(recipe.batch_size, source.num_classes, source.feature_dim)), torch.no_grad():
        for epoch in range(recipe.epochs):
            start = time.perf_counter()
            rows = epoch_rows(labels, sample_index, view, recipe.sampling, generator)
            total, count = None, 0
            for feats, logits, y, index in source.indexed_batches(rows, recipe.batch_size, generator):
                losses, grads = loss_and_grads(params, feats, logits, y, index)
                sgd_step(trainable, grads, momenta, cosine_lr(recipe.lr, step, total_steps), recipe.momentum, recipe.weight_decay)
                step += 1
                total = losses * y.numel() if total is None else total + losses * y.numel()
                count += y.numel()
                bar.update()
            mean = (total / max(count, 1)).tolist() if total is not None else []
            history["loss"].append(mean)
            history["seconds"].append(time.perf_counter() - start)
            if mean:
                bar.set_postfix_str(f"epoch {epoch + 1}/{recipe.epochs} loss {min(mean):.4f} to {max(mean):.4f}")
    return history


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay to 0 over all steps, per iteration (as the official stage-2 schedulers)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def sgd_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], momenta: dict[str, torch.Tensor],
             lr: float, momentum: float, weight_decay: float) -> None:
    """One step of torch.optim.SGD (momentum, no dampening, weight decay added to the gradient), in place.

    By hand because importing torch.optim costs ~3 s (it loads torch._dynamo), more than a small fit.
    """
    for name, p in params.items():
        d = grads[name].add(p, alpha=weight_decay) if weight_decay else grads[name]
        buf = momenta.get(name)
        if buf is None:
            buf = momenta[name] = d.clone()
        else:
            buf.mul_(momentum).add_(d)
        p.add_(buf, alpha=-lr)

