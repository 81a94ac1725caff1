"""Micro-batching: concurrent requests share forward passes.

An asyncio task collects submitted items until ``max_batch`` rows are queued or the first one has waited
``max_wait_ms`` since it arrived (an item that waited through the previous batch does not wait again), then runs ``fn(items)`` on one dedicated inference thread (so the event loop never
blocks and the model is only ever called from one thread) and resolves each caller's future with its
own result. ``fn`` maps a list of items to a list of results of the same length; an exception it raises
is given to every caller of that batch.

    batcher = MicroBatcher(fn, max_batch=32, max_wait_ms=2, rows=len)
    await batcher.start(); result = await batcher.submit(item); await batcher.stop()

With ``max_wait_ms=0`` nothing waits: a batch is whatever was queued while the previous one ran; under
load that alone fills batches, and a deliberate wait would only let a busy event loop run late and
gather every client into one batch, with the model idle while they all come back. With
``inline_rows`` a batch of at most that many rows runs on the event loop itself: for ``/calibrate`` rows a
small batch costs less than the hop to a thread, and a thread running many short torch calls would
fight the busy event loop for the GIL at every call (measured: 2x the CPU per request).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class BatcherStopped(RuntimeError):
    """The batcher is not running (the server is starting or shutting down)."""


class MicroBatcher:
    """Group submissions into batches of at most ``max_batch`` rows and run them on one thread."""

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch: int,
        max_wait_ms: float,
        rows: Callable[[Any], int] = lambda item: 1,
        on_batch: Callable[[int], None] | None = None,
        thread_name: str = "disalign-inference",
        inline_rows: int = 0,
    ):
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.rows = rows
        self.on_batch = on_batch  # called with the number of rows of every batch (metrics)
        self.inline_rows = inline_rows
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future, float]] | None = None  # item, its caller, arrival time
        self._task: asyncio.Task | None = None
        self._inflight: list[asyncio.Future] = []

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run_in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a one-off call (warm-up) on the inference thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="disalign-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        pending = list(self._inflight)
        if self._queue is not None:
            while not self._queue.empty():
                pending.append(self._queue.get_nowait()[1])
        for future in pending:
            if not future.done():
                future.set_exception(BatcherStopped("the server is shutting down."))
        self.executor.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        """Queue one item and wait for its result."""
        if not self.running or self._queue is None:
            raise BatcherStopped("the model is not loaded yet.")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future, time.monotonic()))
        return await future

    async def _collect(self) -> list[tuple[Any, asyncio.Future]]:
        assert self._queue is not None
        item, future, arrived = await self._queue.get()
        batch = [(item, future)]
        size = self.rows(item)
        # The wait counts from the first item's arrival, not from when this task took it: under load the
        # items queued during the previous batch have waited already and go at once, with all queued since.
        deadline = arrived + self.max_wait
        while size < self.max_batch:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    entry = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                entry = self._queue.get_nowait()
            batch.append(entry[:2])
            size += self.rows(entry[0])
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [(item, future) for item, future in batch if not future.done()]  # caller went away
            if not batch:
                continue
            items = [item for item, _ in batch]
            self._inflight = [future for _, future in batch]
            rows = sum(self.rows(item) for item in items)
            if self.on_batch is not None:
                self.on_batch(rows)
            try:
                if rows <= self.inline_rows:
                    results = self.fn(items)
                else:
                    results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as exc:  # given to the callers, who turn it into an error response
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
